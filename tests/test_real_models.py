"""Models and tasks as users have them (issue 13): Hugging Face folders built in the test (a
Qwen-style one: byte-level BPE, no BOS, padded vocabulary, chat template, bf16 weights; a
Llama-style one: BOS, no pad), GSM8K-format JSONL data and the ``math`` verifier. Each test holds
the right behaviour for one failure a new user met."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

from dcmdp.cli import main
from dcmdp.engine import Sample
from dcmdp.models.source import ModelSourceError, resolve_model_folder
from dcmdp.spec import ModelSpec, parse_run
from dcmdp.tasks.prompt import PromptFormat
from dcmdp_trainer.coordinator import Coordinator, Rejected
from dcmdp_trainer.leases import WorkItem
from dcmdp_trainer.local import run_inprocess
from dcmdp_trainer.rollout_source import RunFailed
from dcmdp_trainer.run_loop import RunLoop
from dcmdp_trainer.session import NonFiniteWeights, Session
from dcmdp_trainer.weights import WeightPublisher
from hf_folders import gsm8k_jsonl, llama_style, qwen_style


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf")
    return {"qwen": qwen_style(base / "qwen"), "llama": llama_style(base / "llama"), "data": gsm8k_jsonl(base)}


def manifest(model: dict, data, **over) -> dict:
    spec = {
        "model": model,
        "task": {"name": "jsonl", "dataset": {"path": str(data), "verifier": "math"}, "chatTemplate": "tokenizer",
                 "systemPrompt": "End with #### and the number.", "maxNewTokens": 12, "heldOut": 4},
        "algorithm": {"name": "dc-grpo", "groupSize": 4, "promptsPerStep": 4, "miniBatchSize": 2, "steps": 2,
                      "learningRate": 1e-4},
        "rollout": {"pools": [{"name": "bf16", "precision": "bf16"}]},
        "checkpoint": {"everySteps": 0},
    }
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "real"}, "spec": spec}


def write(tmp_path, doc) -> str:
    import yaml

    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(doc))
    return str(f)


# -- 1. both folder styles train end to end, with the chat template and the math verifier ----------
@pytest.mark.slow
@pytest.mark.parametrize("style", ["qwen", "llama"])
def test_hf_folders_train_end_to_end_with_the_math_verifier(folders, tmp_path, style):
    run = parse_run(manifest({"path": str(folders[style])}, folders["data"]))
    summary = run_inprocess(run, tmp_path / "out", threads=1)
    assert summary["steps"] == 2 and summary["warmstart"] == {"warmstart/steps": 0}  # off for loaded models
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= row["response/truncated_frac"] <= 1.0 and row["optim/skipped_updates"] == 0
        assert row["reward/invalid"] == 0 and row["rollouts"] == 16
    assert len(summary["eval"]) == 2  # start and end


def test_prompts_have_no_none_and_follow_the_template(folders):
    """Qwen has no BOS: prompts used to start with None; Llama keeps its BOS."""
    from dcmdp.models.tokenizer import load_tokenizer

    qwen, llama = load_tokenizer(folders["qwen"]), load_tokenizer(folders["llama"])
    raw = PromptFormat().ids(qwen, "Tom has 3")
    assert None not in raw and raw == qwen("Tom has 3", add_special_tokens=False)["input_ids"]
    assert PromptFormat().ids(llama, "Tom has 3")[0] == llama.bos_token_id
    assert llama.pad_token_id == llama.eos_token_id  # no pad: EOS pads (masked)
    chat = PromptFormat("tokenizer", "Be brief.")
    assert chat.text(qwen, "Tom has 3").endswith("<|im_start|>assistant\n")
    assert "<|im_start|>system\nBe brief.<|im_end|>" in chat.text(qwen, "Tom has 3")
    assert chat.ids(qwen, "x") == qwen(chat.text(qwen, "x"), add_special_tokens=False)["input_ids"]


# -- 2. the padded vocabulary, the trainer's checks and a run that fails instead of waiting -------
@pytest.fixture(scope="module")
def qwen_session(folders, tmp_path_factory):
    run = parse_run(manifest({"path": str(folders["qwen"])}, folders["data"],
                             rollout={"stallTimeoutSeconds": 3.0}))
    s = Session(run, tmp_path_factory.mktemp("run"), threads=1)
    yield s
    s.metrics.close()


def coordinator(session):
    publisher = WeightPublisher(keep=2, skip=("lm_head.weight",))
    publisher.publish(session.version, session.weights(session.version))
    return Coordinator(session, publisher)


def lease_and_submit(coord, make_samples, stop):
    """A worker in a thread: serves every lease with ``make_samples(item)`` until ``stop`` is set."""
    def loop():
        while not stop.is_set():
            rec, finished = coord.acquire("w0", "bf16", coord.version, wait=0.1)
            if finished:
                return
            if rec is None:
                continue
            try:
                coord.submit("w0", "bf16", rec.lease_id, rec.version, make_samples(rec.item), 0.1, 4)
            except Rejected:
                pass
    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def samples_for(item, response, logprobs):
    return [Sample(p.index, list(response), list(logprobs)) for p in item.prompts for _ in range(item.n)]


def test_the_vocabulary_is_the_models_embedding_not_the_tokenizer(qwen_session):
    assert qwen_session.vocab_size == 448 > len(qwen_session.tokenizer)
    coord = coordinator(qwen_session)
    eos = qwen_session.tokenizer.eos_token_id
    coord.start()
    rec = coord.book.acquire("bf16", "w0", coord._version_for)
    # a padded-row id (>= len(tokenizer), < embedding rows) is a valid sample, as engines may draw it
    assert coord.submit("w0", "bf16", rec.lease_id, 0, samples_for(rec.item, [440, eos], [-9.0, -1.0]), 0.1, 8) > 0


@pytest.mark.parametrize("logprob, cause", [(-9999.0, "logprob_floor"), (-95.0, "logprob_floor"),
                                            (0.0009, "logprob_positive"), (float("nan"), "logprob_not_finite")])
def test_implausible_logprobs_are_rejected_and_the_run_fails_with_the_cause(qwen_session, logprob, cause):
    coord = coordinator(qwen_session)
    eos = qwen_session.tokenizer.eos_token_id
    stop = threading.Event()

    def make(item):
        return samples_for(item, [5, eos], [-1.0, -1.0] if item.is_eval else [-1.0, logprob])
    lease_and_submit(coord, make, stop)
    try:
        with pytest.raises(RunFailed, match=f"every submission of a step was rejected as malformed \\({cause}\\)"):
            RunLoop(qwen_session, coord, state=coord.state).run()
    finally:
        stop.set()
    assert coord.state.phase == "Failed" and cause in coord.state.message and coord.rejected["malformed"] >= 1
    assert qwen_session.step == 0  # nothing trained


def test_empty_responses_and_non_finite_timings_are_rejected(qwen_session):
    coord = coordinator(qwen_session)
    coord.start()
    rec = coord.book.acquire("bf16", "w0", coord._version_for)
    with pytest.raises(Rejected, match="empty response"):
        coord.submit("w0", "bf16", rec.lease_id, 0, samples_for(rec.item, [], []), 0.1, 0)
    rec = coord.book.acquire("bf16", "w0", coord._version_for)
    eos = qwen_session.tokenizer.eos_token_id
    with pytest.raises(Rejected, match="sampling_seconds nan"):
        coord.submit("w0", "bf16", rec.lease_id, 0, samples_for(rec.item, [eos], [-1.0]), float("nan"), 1)


def test_a_run_with_no_accepted_rollouts_fails_after_the_stall_timeout(qwen_session):
    coord = coordinator(qwen_session)  # no worker at all (stallTimeoutSeconds: 3)
    t0 = time.monotonic()
    with pytest.raises(RunFailed, match="no rollout accepted .* is any rollout worker running"):
        RunLoop(qwen_session, coord, state=coord.state).run()
    assert time.monotonic() - t0 < 10 and coord.snapshot().phase == "Failed"


def test_one_malformed_evaluation_submission_is_released_not_fatal(folders, tmp_path):
    """The evaluation is one work item per pool: a malformed submission for it is released and
    leased again (as a training item's is); the run fails only when the same cause repeats."""
    run = parse_run(manifest({"path": str(folders["qwen"])}, folders["data"], rollout={"stallTimeoutSeconds": 30.0}))
    s = Session(run, tmp_path, threads=1)
    coord = coordinator(s)
    eos = s.tokenizer.eos_token_id
    stop, bad = threading.Event(), []

    def make(item):
        if item.is_eval and not bad:  # the first evaluation lease: no samples at all
            bad.append(item.key)
            return []
        return samples_for(item, [5, eos], [-1.0, -1.0])
    lease_and_submit(coord, make, stop)
    try:
        RunLoop(s, coord, state=coord.state).run()
    finally:
        stop.set()
        s.metrics.close()
    assert coord.state.phase == "Succeeded" and s.step == 2 and coord.rejected == {"malformed": 1}
    assert bad == ["eval1/bf16"] and len(coord.last_rejection) < 300  # prompt indices listed, capped
    # three malformed submissions for the evaluation item in a row do fail the run
    coord.state.update(phase="Running")
    coord.eval_round += 1
    item = WorkItem("eval-x/bf16", "bf16", -1, s.held_out_prompts(), seed=0, n=1, max_new_tokens=8, is_eval=True,
                    version=coord.version)
    coord.book.add(item)
    for k in range(3):
        assert coord.failure == "", k
        rec = coord.book.acquire("bf16", "w0", coord._version_for)
        assert rec is not None and rec.item.key == item.key  # released and leased again
        with pytest.raises(Rejected, match="malformed"):
            coord.submit("w0", "bf16", rec.lease_id, coord.version, [], 0.1, 4)
    assert coord.state.phase == "Failed" and "3 in a row" in coord.failure


# -- 3. never train on, publish or checkpoint poison ----------------------------------------------
def test_a_non_finite_loss_or_gradient_is_skipped_not_applied(qwen_session):
    learner = qwen_session.learner
    before = {k: v.clone() for k, v in qwen_session.model.state_dict().items()}
    assert not learner.backward(torch.tensor(float("nan"), requires_grad=True), last=True)  # nothing accumulated
    p = next(qwen_session.model.parameters())
    handle = p.register_hook(lambda g: g * float("inf"))
    try:
        assert learner.backward(sum(q.sum() for q in qwen_session.model.parameters()) * 0.0 + p.sum(), last=True)
        norm = learner.optimizer_step()
    finally:
        handle.remove()
    assert not math.isfinite(norm)
    assert all(q.grad is None for q in qwen_session.model.parameters())  # the gradients were dropped
    after = qwen_session.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_weights_are_never_published(folders, tmp_path):
    run = parse_run(manifest({"path": str(folders["qwen"])}, folders["data"]))
    s = Session(run, tmp_path, threads=1)
    try:
        with torch.no_grad():
            next(s.model.parameters())[0, 0] = float("nan")
        s.step = 1
        with pytest.raises(NonFiniteWeights, match="NaN/inf"):
            s._publish()
        with pytest.raises(NonFiniteWeights):
            s.save_checkpoint()
        assert all(torch.isfinite(v).all() for v in s.history[s.version].values())  # the good one stays
        assert not (tmp_path / "checkpoints").exists()
    finally:
        s.metrics.close()


# -- 4. rewards for real tasks --------------------------------------------------------------------
def test_math_and_numeric_verifiers_read_chain_of_thought_answers():
    from dcmdp.tasks.base import math_match, numeric_match

    ref = "Tom has 3 + 4 = 7 apples.\n#### 7"
    for response in ("so he has 7", "#### 7", "The answer is \\boxed{7}.", "7.0"):
        assert math_match(response, ref) == 1.0, response
    assert math_match("\\boxed{\\frac{14}{2}}", ref) == 1.0 and math_match("\\boxed{0.5}", "\\frac{1}{2}") == 1.0
    assert math_match("#### 8", ref) == 0.0 and math_match("no idea", ref) == 0.0
    assert math_match("#### 1,234", "#### 1234") == 1.0
    assert numeric_match("3 + 4 = 7", ref) == 1.0 and numeric_match("7 is wrong, 8", ref) == 0.0
    assert numeric_match("1,234.5", "1234.5") == 1.0 and numeric_match("none", ref) == 0.0


def bad_verifier(response, answer):  # a user verifier returning NaN / None by the answer
    return {"nan": float("nan"), "none": None}.get(answer, 1.0)


@pytest.mark.parametrize("policy", ["error", "zero"])
def test_a_verifier_returning_nan_or_none_is_named_or_scored_zero(folders, tmp_path, policy):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": a}) + "\n"
                            for i, a in enumerate(["nan", "none", "ok", "ok"])))
    run = parse_run(manifest({"path": str(folders["qwen"])}, data,
                             task={"dataset": {"path": str(data), "verifier": "test_real_models:bad_verifier",
                                               "invalidReward": policy}}))
    s = Session(run, tmp_path / "out", threads=1)
    try:
        from dcmdp.tasks import Problem

        for answer in ("nan", "none"):
            if policy == "error":
                with pytest.raises(ValueError, match=f"verifier 'test_real_models:bad_verifier' returned .* for prompt 'p'"):
                    s.reward([5], Problem("p", answer))
            else:
                assert s.reward([5], Problem("p", answer)) == 0.0
        assert s.reward([5], Problem("p", "ok")) == 1.0
        assert s.invalid_rewards == (2 if policy == "zero" else 0)
    finally:
        s.metrics.close()


def test_dcmdp_run_stops_on_a_nan_reward_naming_verifier_and_prompt(folders, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": "nan"}) + "\n" for i in range(4)))
    doc = manifest({"path": str(folders["qwen"])}, data,
                   task={"dataset": {"path": str(data), "verifier": "test_real_models:bad_verifier"}})
    out = tmp_path / "out"
    assert main(["run", "-f", write(tmp_path, doc), "--out", str(out), "--inprocess", "--quiet", "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "RewardError: verifier 'test_real_models:bad_verifier' returned nan" in err and "for prompt 'p" in err
    assert not (out / "checkpoints").exists()  # nothing trained, nothing checkpointed


# -- 5. lengths -----------------------------------------------------------------------------------
def test_overlong_prompts_are_dropped_with_a_count_or_refused(folders, tmp_path, caplog):
    data = tmp_path / "long.jsonl"
    rows = [{"prompt": f"short {i}", "answer": "#### 1"} for i in range(6)] + [{"prompt": "word " * 600, "answer": "#### 2"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = manifest({"path": str(folders["qwen"])}, data)  # context 512
    s = Session(parse_run(doc), tmp_path / "a", threads=1)
    s.metrics.close()
    assert s.dropped_prompts == 1 and all("word" not in p.prompt for p in s.task.problems())
    assert "dropped 1 prompt(s)" in caplog.text and "'word word" in caplog.text
    doc["spec"]["task"]["overlongPrompts"] = "refuse"
    with pytest.raises(ValueError, match=r"spec.task.dataset.path: 1 prompt\(s\) longer than 500 tokens .*\(overlongPrompts: refuse\)"):
        Session(parse_run(doc), tmp_path / "b", threads=1)


def test_truncation_is_measured_and_warned_about(folders, tmp_path, caplog):
    run = parse_run(manifest({"path": str(folders["qwen"])}, folders["data"], task={"maxNewTokens": 2},
                             algorithm={"steps": 1}))
    run_inprocess(run, tmp_path / "out", threads=1)
    row = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["response/truncated_frac"] > 0.5  # a random model rarely samples EOS in 2 tokens
    assert "hit maxNewTokens (2) before EOS" in caplog.text


def test_validate_checks_paths_and_warns_about_long_reference_answers(folders, tmp_path, capsys):
    doc = manifest({"path": str(folders["qwen"])}, folders["data"], task={"maxNewTokens": 4})
    assert main(["validate", "-f", write(tmp_path, doc)]) == 0
    assert "reference answers are longer" in capsys.readouterr().err
    doc = manifest({"path": str(tmp_path / "no-model")}, tmp_path / "no.jsonl")
    assert main(["validate", "-f", write(tmp_path, doc)]) == 2
    err = capsys.readouterr().err
    assert "spec.model.path" in err and "does not exist" in err and "spec.task.dataset.path" in err


# -- 6. models and output folders -----------------------------------------------------------------
def test_a_hub_id_offline_and_uncached_is_an_error_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelSourceError, match="spec.model.name: cannot get Qwen/Qwen3-0.6B@main"):
        resolve_model_folder(ModelSpec(name="Qwen/Qwen3-0.6B", revision="main"))
    with pytest.raises(ModelSourceError, match="spec.model.path: .* does not exist"):
        resolve_model_folder(ModelSpec(path=str(tmp_path / "nothing")))


def test_model_spec_rules_and_the_warm_start_default():
    assert ModelSpec().warm_start_steps == 100 and ModelSpec(path="x").warm_start_steps == 0
    assert ModelSpec(name="a/b", warm_start={"steps": 5}).warm_start_steps == 5
    with pytest.raises(ValueError, match="model.path or model.name, not both"):
        ModelSpec(path="x", name="a/b")
    with pytest.raises(ValueError, match="revision needs model.name"):
        ModelSpec(path="x", revision="main")


@pytest.mark.slow
def test_output_folders_are_never_mixed_and_resume_keeps_evaluations(folders, tmp_path, capsys):
    doc = manifest({"path": str(folders["qwen"])}, folders["data"], algorithm={"steps": 2},
                   checkpoint={"everySteps": 1}, eval={"everySteps": 1})
    f, out = write(tmp_path, doc), str(tmp_path / "out")
    assert main(["run", "-f", f, "--out", out, "--inprocess", "--quiet", "--steps", "1", "--threads", "1"]) == 0
    assert main(["run", "-f", f, "--out", out, "--inprocess", "--quiet", "--threads", "1"]) == 2
    assert "already holds a run;" in capsys.readouterr().err
    assert main(["run", "-f", f, "--out", out, "--inprocess", "--quiet", "--resume", "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [e["step"] for e in summary["eval"]] == [0, 1, 2]  # the evaluations before the checkpoint kept
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", "-f", f, "--out", out, "--inprocess", "--quiet", "--resume"]) == 0
    assert "already finished (2 of 2 steps); nothing to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == before
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(["run", "-f", f, "--out", out, "--inprocess", "--quiet", "--overwrite", "--steps", "1",
                 "--threads", "1"]) == 0
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 1
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_gpu_example_recipe_runs_with_a_qwen_style_folder(folders, tmp_path):
    """examples/gpu-cluster.yaml's model and task sections, as written, on the CPU: only the paths,
    the sizes and the cluster parts (vLLM pools, DeepSpeed, GPUs) are swapped out."""
    import yaml

    from dcmdp.spec import load_run

    doc = yaml.safe_load(open("examples/gpu-cluster.yaml"))
    spec = doc["spec"]
    assert spec["task"]["dataset"]["verifier"] == "math" and spec["task"]["chatTemplate"] == "tokenizer"
    spec["model"]["path"] = str(folders["qwen"])
    spec["task"]["dataset"]["path"] = str(folders["data"])
    spec["task"].update(heldOut=4, maxNewTokens=8)
    spec["algorithm"].update(groupSize=2, promptsPerStep=2, miniBatchSize=1, steps=1)
    spec["trainer"] = {"precision": "bf16"}
    spec["rollout"] = {"pools": [{"name": "bf16", "precision": "bf16", "tolerance": "auto"}]}
    spec["checkpoint"] = {"everySteps": 0}
    spec.pop("scheduling")
    summary = run_inprocess(load_run(write(tmp_path, doc)), tmp_path / "out", threads=1)
    assert summary["steps"] == 1 and summary["warmstart"] == {"warmstart/steps": 0}


def test_a_cached_hub_id_loads_offline_in_the_asked_dtype(folders, tmp_path, monkeypatch):
    """``model.name`` resolves through huggingface_hub's cache layout with no network."""
    import shutil

    import huggingface_hub.constants as hc

    from dcmdp.models.tiny import build_model

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--acme--tiny-qwen"
    shutil.copytree(folders["qwen"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "cache"))
    spec = ModelSpec(name="acme/tiny-qwen")
    assert resolve_model_folder(spec) == repo / "snapshots" / commit
    model, tok = build_model(spec)
    assert next(model.parameters()).dtype == torch.float32 and tok.bos_token_id is None  # bf16 file upcast
    model, _ = build_model(ModelSpec(name="acme/tiny-qwen", dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16
