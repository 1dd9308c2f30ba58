"""``dcmdp export``: a run's trained weights as a Hugging Face folder that transformers loads, from
a real (tiny, in-process) run; refusals name their cause and write nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dcmdp.cli import main
from dcmdp.models.tokenizer import load_tokenizer
from dcmdp.tasks.prompt import PromptFormat
from dcmdp_trainer import checkpoint
from dcmdp_trainer.local import run_inprocess
from runtime_helpers import tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    run_inprocess(tiny_run(algorithm={"steps": 2}, model={"warmStart": {"steps": 0}}), out, threads=1)
    return out


def trained(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read(checkpoint.latest(run_dir))["learner"]["model"]


def test_the_export_loads_in_transformers_with_the_trained_weights(run_dir, tmp_path, capsys):
    to = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", str(to)]) == 0
    assert f"{to}: step 2" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(str(to))
    start = AutoModelForCausalLM.from_pretrained(str(run_dir / "model"))
    weights = trained(run_dir)
    got = model.state_dict()
    assert set(got) == set(weights)
    assert all(torch.equal(got[k], weights[k]) for k in weights)  # the starting model's dtype: fp32
    assert any(not torch.equal(start.state_dict()[k], weights[k]) for k in weights)  # it did train
    tok = AutoTokenizer.from_pretrained(str(to))
    trained_on = PromptFormat("none").ids(load_tokenizer(run_dir / "model"), "1+2=")  # [BOS] + the text's tokens
    assert tok("1+2=")["input_ids"] == trained_on and trained_on[0] == tok.bos_token_id
    assert AutoTokenizer.from_pretrained(str(run_dir / "model"))("1+2=")["input_ids"] == trained_on[1:]  # (no BOS)
    ids = torch.tensor([tok("1+2=")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()
    record = json.loads((to / "dcmdp_export.json").read_text())
    assert record["run"] == "tiny" and record["step"] == 2 and record["checkpoint"] == "step-00000002.pt"
    assert record["sha256"] == checkpoint.sha256_file(run_dir / "checkpoints" / "step-00000002.pt")
    assert record["dtype"] == "float32" and record["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["prompt_format"] == {"chat_template": "none", "system_prompt": None, "bos": True,
                                       "use": "the plain text: tokenizer(text) gives the ids the run trained on"}
    assert not list(tmp_path.glob(".hf.*"))  # no temporary folder left behind


def test_the_exported_model_asked_in_plain_text_answers_as_in_the_run(run_dir, tmp_path):
    """What a user does: tokenizer(text) -> generate. The run trained on [BOS] + tokens; a folder
    whose tokenizer adds no BOS answered nothing right (held-out accuracy 0.0 against 0.945 with it,
    a fresh user's demo run). Greedy answers to the run's own prompts, asked both ways, agree."""
    to = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", str(to)]) == 0
    tok, model = AutoTokenizer.from_pretrained(str(to)), AutoModelForCausalLM.from_pretrained(str(to))
    fmt = PromptFormat("none")
    for prompt in ("12+34=", "7+8=", "99+1="):
        plain = tok(prompt, return_tensors="pt")
        as_trained = torch.tensor([fmt.ids(load_tokenizer(run_dir / "model"), prompt)])
        assert torch.equal(plain["input_ids"], as_trained)
        a = model.generate(**plain, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        b = model.generate(as_trained, attention_mask=torch.ones_like(as_trained), max_new_tokens=4,
                           do_sample=False, pad_token_id=tok.pad_token_id)
        assert torch.equal(a, b)


def test_a_chat_template_run_records_its_format_and_system_prompt(tmp_path, capsys):
    out = tmp_path / "run"
    run_inprocess(tiny_run(algorithm={"steps": 1}, model={"warmStart": {"steps": 0}},
                           task={"chatTemplate": "tokenizer", "systemPrompt": "Add the numbers."}), out, threads=1)
    to = tmp_path / "hf"
    assert main(["export", str(out), "--to", str(to)]) == 0
    assert "the run used a system prompt ('Add the numbers.')" in capsys.readouterr().err
    record = json.loads((to / "dcmdp_export.json").read_text())["prompt_format"]
    assert record["chat_template"] == "tokenizer" and record["system_prompt"] == "Add the numbers."
    tok = AutoTokenizer.from_pretrained(str(to))  # the chat template renders the prompt as the run did
    messages = [{"role": "system", "content": "Add the numbers."}, {"role": "user", "content": "1+2="}]
    assert (tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            == PromptFormat("tokenizer", "Add the numbers.").ids(load_tokenizer(out / "model"), "1+2="))
    (out / "run.json").unlink()  # a folder without its spec: exported, with a warning
    assert main(["export", str(out), "--to", str(tmp_path / "bare")]) == 0
    assert "run.json) is missing or unreadable" in capsys.readouterr().err


def test_a_bf16_export_holds_the_weights_rounded_to_bf16(run_dir, tmp_path):
    to = tmp_path / "bf16"
    assert main(["export", str(run_dir), "--to", str(to), "--dtype", "bf16"]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(to), dtype="auto")
    assert json.loads((to / "config.json").read_text())["dtype"] == "bfloat16"
    for k, w in trained(run_dir).items():
        assert torch.equal(model.state_dict()[k], w.to(torch.bfloat16)), k


def test_refusals_name_the_cause_and_write_nothing(run_dir, tmp_path, capsys):
    def refused(*argv: str) -> str:
        assert main(["export", *argv]) == 2
        return capsys.readouterr().err

    assert "nowhere: no such folder" in refused(str(tmp_path / "nowhere"), "--to", str(tmp_path / "a"))
    assert "not a dcmdp run folder" in refused(str(run_dir / "checkpoints"), "--to", str(tmp_path / "a"))
    assert "--step 9: no checkpoint of that step" in refused(str(run_dir), "--to", str(tmp_path / "a"), "--step", "9")
    marks = sorted(p.name for p in run_dir.iterdir())
    for inside in (run_dir, run_dir / "model" / "x", run_dir / "checkpoints", run_dir.parent):  # never destroyed
        assert "is the run folder" in refused(str(run_dir), "--to", str(inside), "--overwrite")
    assert sorted(p.name for p in run_dir.iterdir()) == marks and checkpoint.latest(run_dir) is not None
    assert "give the folder to write" in refused(str(run_dir), "--to", "", "--overwrite")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert "pass --overwrite" in refused(str(run_dir), "--to", str(busy))
    assert "not an earlier export, not replaced" in refused(str(run_dir), "--to", str(busy), "--overwrite")
    assert (busy / "keep.txt").read_text() == "mine" and not (tmp_path / "a").exists()
    (tmp_path / "file").write_text("x")
    assert "is a file" in refused(str(run_dir), "--to", str(tmp_path / "file"), "--overwrite")
    assert "cannot write beside it" in refused(str(run_dir), "--to", str(tmp_path / "file" / "sub"))
    (tmp_path / "link").symlink_to(busy)
    assert "symbolic link" in refused(str(run_dir), "--to", str(tmp_path / "link"), "--overwrite")
    assert (busy / "keep.txt").read_text() == "mine"

    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    pt = broken / "checkpoints" / "step-00000002.pt"
    data = bytearray(pt.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pt.write_bytes(bytes(data))
    err = refused(str(broken), "--to", str(tmp_path / "b"))
    assert "step-00000002.pt" in err and "sha256" in err and not (tmp_path / "b").exists()


def test_an_fp16_cast_that_overflows_names_the_tensor_and_writes_nothing(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir / "model", out / "model")
    state = checkpoint.read(checkpoint.latest(run_dir))
    name = next(k for k in state["learner"]["model"] if k.endswith("q_proj.weight"))
    state["learner"]["model"][name][0, 0] = 1e6  # finite in fp32, inf in fp16
    checkpoint.save(out, 3, state)
    assert main(["export", str(out), "--to", str(tmp_path / "fp16"), "--dtype", "fp16"]) == 2
    err = capsys.readouterr().err
    assert name in err and "float16" in err and "1e+06" in err
    assert not (tmp_path / "fp16").exists()
    assert main(["export", str(out), "--to", str(tmp_path / "fp32"), "--dtype", "fp32"]) == 0  # fine in fp32


def test_a_broken_newest_checkpoint_falls_back_to_the_newest_intact_one(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    state = checkpoint.read(checkpoint.latest(run_dir))
    newer = checkpoint.save(out, 3, {**state, "step": 3}, keep=5)
    newer.write_bytes(newer.read_bytes()[:-10])  # truncated: its record no longer matches
    assert main(["export", str(out), "--to", str(tmp_path / "hf")]) == 0
    assert "warning: skipped step-00000003.pt" in capsys.readouterr().err  # said, not only logged
    assert json.loads((tmp_path / "hf" / "dcmdp_export.json").read_text())["step"] == 2


def test_overwrite_replaces_an_earlier_export_whole(run_dir, tmp_path):
    to = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", str(to), "--dtype", "bf16"]) == 0
    (to / "stale.txt").write_text("from before")
    assert main(["export", str(run_dir), "--to", str(to), "--overwrite"]) == 0
    assert json.loads((to / "dcmdp_export.json").read_text())["dtype"] == "float32"
    assert not (to / "stale.txt").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_tied_head_that_differs_from_the_embedding_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(run_dir / "model", out / "model")
    assert json.loads((out / "model" / "config.json").read_text()).get("tie_word_embeddings")
    state = checkpoint.read(checkpoint.latest(run_dir))
    weights = state["learner"]["model"]
    weights["lm_head.weight"] = weights["lm_head.weight"].clone() + 1.0
    checkpoint.save(out, 2, state)
    assert main(["export", str(out), "--to", str(tmp_path / "hf")]) == 2
    assert "lm_head.weight differs from the input embedding" in capsys.readouterr().err


VLLM_CHILD = """
import json, sys
from vllm import LLM, SamplingParams

if __name__ == "__main__":  # (vLLM starts its engine core in a spawned process)
    folder, text, out = sys.argv[1], sys.argv[2], sys.argv[3]
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, seed=0, logprobs_mode="processed_logprobs",
              generation_config="vllm")
    res = llm.generate([text], SamplingParams(n=4, max_tokens=12, temperature=1.0, logprobs=0, seed=1))
    samples = [dict(tokens=list(c.token_ids), logprobs=[lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)])
               for c in res[0].outputs]
    open(out, "w").write(json.dumps(dict(prompt=list(res[0].prompt_token_ids), samples=samples)))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_the_export_serves_in_vllm_with_the_trained_weights(run_dir, tmp_path):
    """What a user does next: point vLLM at the exported folder and send it text. It asks the model
    with the ids the run trained on, and its fp32 logprobs of what it samples equal transformers'
    on the exported weights (to 1e-4), and not the starting model's."""
    import os
    import subprocess

    vllm_python = Path(os.environ.get("DCMDP_VLLM_PYTHON", Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"))
    if not vllm_python.exists():
        pytest.fail(f"the vLLM venv is missing ({vllm_python}): run `make vllm-venv` (`make test` builds it)",
                    pytrace=False)
    to = tmp_path / "hf"
    assert main(["export", str(run_dir), "--to", str(to)]) == 0
    ids = PromptFormat("none").ids(load_tokenizer(run_dir / "model"), "1+2=")  # what the run trained on
    (tmp_path / "child.py").write_text(VLLM_CHILD)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([str(vllm_python), str(tmp_path / "child.py"), str(to), "1+2=",
                           str(tmp_path / "out.json")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"vLLM could not serve the export:\n{proc.stderr[-4000:]}"
    served = json.loads((tmp_path / "out.json").read_text())
    assert served["prompt"] == ids  # vLLM, given the text, asks with the ids the run trained on (BOS first)
    samples = served["samples"]
    assert len(samples) == 4 and all(s["tokens"] for s in samples)

    def teacher_forced(folder: Path, tokens: list[int]) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        with torch.no_grad():
            logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1]
        return torch.log_softmax(logits, -1)[torch.arange(len(tokens)), torch.tensor(tokens)]

    exported = torch.cat([teacher_forced(to, s["tokens"]) - torch.tensor(s["logprobs"]) for s in samples]).abs()
    started = torch.cat([teacher_forced(run_dir / "model", s["tokens"]) - torch.tensor(s["logprobs"])
                         for s in samples]).abs()
    print(f"vllm vs export: max |dlogprob| {exported.max():.2e}; vs the starting model {started.max():.2e}")
    assert exported.max() < 1e-4, exported.max()
    assert started.max() > 10 * max(exported.max(), 1e-6), (started.max(), exported.max())


def test_a_killed_exports_leftover_is_deleted_by_the_next_and_a_running_ones_is_not(run_dir, tmp_path, capsys):
    to = tmp_path / "hf"
    killed = tmp_path / ".hf.k1lled_1"  # what an export killed midway leaves: its lock file, held by no one
    killed.mkdir()
    (killed / ".dcmdp-export.lock").touch()
    (killed / "model.safetensors").write_bytes(b"\0" * (3 << 20))
    running = tmp_path / ".hf.running1"  # an export running now: its lock is held (by another process)
    running.mkdir()
    (running / ".dcmdp-export.lock").touch()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys, time
        f = open({str(running / '.dcmdp-export.lock')!r}, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        print("held", flush=True)
        sys.stdin.read()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other = tmp_path / ".hf.n0lock00"  # no lock file (an export that has just made it): left alone
        other.mkdir()
        assert main(["export", str(run_dir), "--to", str(to)]) == 0
        err = capsys.readouterr().err
        assert f"deleted {killed} (3 MiB)" in err and "killed midway" in err
        assert not killed.exists() and running.is_dir() and other.is_dir()
        assert not (to / ".dcmdp-export.lock").exists()  # (the lock file is not part of the export)
        AutoModelForCausalLM.from_pretrained(str(to))
    finally:
        holder.stdin.close()
        holder.wait(30)
    shutil.rmtree(to)
    assert main(["export", str(run_dir), "--to", str(to)]) == 0  # the holder is gone: its folder goes too
    assert not running.exists() and other.is_dir()


def test_a_cleaner_never_sees_a_running_exports_lock_unlocked(run_dir, tmp_path, monkeypatch):
    import fcntl
    import threading
    import time

    import dcmdp_trainer.export as export

    class SlowLock:  # the export's own flock comes 1 s after it opened the lock file
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(f, op):
            if not isinstance(f, int):
                time.sleep(1.0)
            return fcntl.flock(f, op)

    monkeypatch.setattr(export, "fcntl", SlowLock)
    to, out = tmp_path / "hf", {}
    t = threading.Thread(target=lambda: out.update(result=export.export_run(run_dir, to)))
    t.start()
    deadline = time.monotonic() + 30
    while not list(tmp_path.glob(".hf.*")) and time.monotonic() < deadline:
        time.sleep(0.005)
    running = list(tmp_path.glob(".hf.*"))
    assert export._remove_leftovers(to) == [] and all(d.is_dir() for d in running)  # another export's cleaner
    t.join(60)
    assert out["result"].folder == str(to) and (to / "dcmdp_export.json").is_file()
