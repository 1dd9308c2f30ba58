"""What `dcmdp validate` and `dcmdp run` check before a run starts: what the run would refuse later
(with a traceback at start-up, or at the first reward) is refused up front, exit 2, naming the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dcmdp.cli import main
from dcmdp.preflight import check_inputs
from dcmdp.spec import parse_run
from hf_folders import gsm8k_jsonl, gsm8k_problems, qwen_style


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("preflight")
    good = qwen_style(base / "qwen")
    no_eos = qwen_style(base / "no-eos")
    config = json.loads((no_eos / "tokenizer_config.json").read_text())
    del config["eos_token"]
    (no_eos / "tokenizer_config.json").write_text(json.dumps(config))
    return {"qwen": good, "no-eos": no_eos, "data": gsm8k_jsonl(base)}


def manifest(model: Path, data: Path, **task) -> dict:
    return {"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "pre"},
            "spec": {"model": {"path": str(model)},
                     "task": {"name": "jsonl", "dataset": {"path": str(data), "verifier": "math"},
                              "maxNewTokens": 32, "heldOut": 4, **task}}}


def write(tmp_path: Path, doc: dict) -> str:
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(doc))
    return str(f)


def refused(capsys, argv: list[str]) -> list[str]:
    """Runs the CLI, expects exit 2 and ``error: <file> is invalid:`` (no traceback); returns the
    ``<field>: <problem>`` lines that follow."""
    assert main(argv) == 2
    head, *lines = capsys.readouterr().err.strip().splitlines()
    assert head == f"error: {argv[argv.index('-f') + 1]} is invalid:"
    return [line.strip() for line in lines]


def test_a_good_run_passes(folders, tmp_path, capsys):
    assert check_inputs(parse_run(manifest(folders["qwen"], folders["data"]))).problems == []
    assert main(["validate", "-f", write(tmp_path, manifest(folders["qwen"], folders["data"]))]) == 0


def test_a_tokenizer_without_eos_is_refused_by_validate_and_run(folders, tmp_path, capsys):
    f = write(tmp_path, manifest(folders["no-eos"], folders["data"]))
    for argv in (["validate", "-f", f], ["run", "-f", f, "--out", str(tmp_path / "out"), "--inprocess"]):
        lines = refused(capsys, argv)
        assert lines == [f"spec.model: the tokenizer in {folders['no-eos']} has no eos_token "
                         "(responses could never end)"]
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_malformed_dataset_line_is_refused_naming_file_and_line(folders, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = [json.dumps(p) for p in gsm8k_problems(6)]
    rows[2] = '{"prompt": "no answer"}'
    data.write_text("\n".join(rows) + "\n")
    f = write(tmp_path, manifest(folders["qwen"], data))
    for argv in (["validate", "-f", f], ["run", "-f", f, "--out", str(tmp_path / "out"), "--inprocess"]):
        [line] = refused(capsys, argv)
        assert line.startswith(f"spec.task.dataset.path: {data}:3: each line must be a JSON object "
                               "with a non-empty string 'prompt' and a string or number 'answer' (KeyError")


def test_unreadable_math_references_are_refused_with_their_count(folders, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    problems = gsm8k_problems(6)
    problems[1]["answer"] = problems[4]["answer"] = "I do not know"
    data.write_text("".join(json.dumps(p) + "\n" for p in problems))
    f = write(tmp_path, manifest(folders["qwen"], data))
    [line] = refused(capsys, ["validate", "-f", f])
    assert line == ("spec.task.dataset.path: 2 of 6 reference answers have no final answer the math "
                    "verifier can read (first: 'I do not know'); end each with '#### <answer>' or \\boxed{<answer>}")
    # another verifier reads them as they are
    assert main(["validate", "-f", write(tmp_path, manifest(folders["qwen"], data, dataset={
        "path": str(data), "verifier": "exact"}))]) == 0


def test_a_chat_template_the_tokenizer_lacks_is_refused(folders, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(folders["qwen"], plain)
    (plain / "chat_template.jinja").unlink()
    doc = manifest(plain, folders["data"], chatTemplate="tokenizer")
    [line] = refused(capsys, ["validate", "-f", write(tmp_path, doc)])
    assert line == "spec.task.chatTemplate: 'tokenizer' but the model's tokenizer has no chat_template"


@pytest.mark.parametrize("config, why", [
    ({"model_type": "not-a-model"}, "transformers cannot read it"),
    ({"model_type": "vit", "architectures": ["ViTModel"]},
     "model_type 'vit' has no causal-LM class in transformers (architectures: ['ViTModel'])"),
])
def test_a_config_transformers_cannot_build_as_a_causal_lm_is_refused(folders, tmp_path, capsys, config, why):
    odd = tmp_path / "odd"
    shutil.copytree(folders["qwen"], odd)
    (odd / "config.json").write_text(json.dumps(config))
    [line] = refused(capsys, ["validate", "-f", write(tmp_path, manifest(odd, folders["data"]))])
    assert line.startswith(f"spec.model.path: {odd}/config.json: {why}"), line


def test_a_verifier_with_the_wrong_signature_is_refused(folders, tmp_path, capsys, monkeypatch):
    (tmp_path / "my_verifiers.py").write_text("def judge(response):\n    return 1.0\n\n"
                                              "def fine(response, answer, *, strict=False):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = manifest(folders["qwen"], folders["data"], dataset={"path": str(folders["data"]),
                                                              "verifier": "my_verifiers:judge"})
    [line] = refused(capsys, ["validate", "-f", write(tmp_path, doc)])
    assert line == "spec.task.dataset.verifier: 'my_verifiers:judge' must take (response, answer), its signature is judge(response)"
    doc["spec"]["task"]["dataset"]["verifier"] = "my_verifiers:fine"
    assert main(["validate", "-f", write(tmp_path, doc)]) == 0


@pytest.mark.parametrize("config", ["[1, 2, 3]", '"qwen3"', "null", '{"model_type": ["qwen3"]}',
                                    '{"model_type": "qwen3", "hidden_size": NaN}', "[" * 100000 + "]" * 100000])
def test_a_config_json_that_is_not_a_config_is_refused_without_a_traceback(folders, tmp_path, capsys, config):
    odd = tmp_path / "odd"
    shutil.copytree(folders["qwen"], odd)
    (odd / "config.json").write_text(config)
    [line] = refused(capsys, ["validate", "-f", write(tmp_path, manifest(odd, folders["data"]))])
    assert line.startswith(f"spec.model.path: {odd}/config.json: transformers cannot read it (without custom code): ")


def test_a_folder_that_needs_custom_code_is_refused_and_its_code_never_runs(folders, tmp_path, capsys):
    odd = tmp_path / "custom"
    shutil.copytree(folders["qwen"], odd)
    marker = tmp_path / "ran"
    (odd / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                 "from transformers import PretrainedConfig\n"
                                 "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    config = json.loads((odd / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    (odd / "config.json").write_text(json.dumps(config))
    [line] = refused(capsys, ["validate", "-f", write(tmp_path, manifest(odd, folders["data"]))])
    assert line.startswith(f"spec.model.path: {odd}/config.json: transformers cannot read it (without custom code)")
    assert not marker.exists()


@pytest.mark.parametrize("source, message", [
    ("raise RuntimeError('boom at import')\n", "importing 'bad_verifier' failed: RuntimeError: boom at import"),
    ("def f(:\n", "importing 'bad_verifier' failed: SyntaxError"),
    ("import sys\nsys.exit(3)\n", "importing 'bad_verifier' failed: SystemExit: 3"),
    ("class f:\n    def __init__(self, response, answer):\n        pass\n",
     "'bad_verifier:f' must be a function returning a number, not a class, a generator or a coroutine function"),
    ("def f(response, answer):\n    yield 1.0\n",
     "'bad_verifier:f' must be a function returning a number, not a class, a generator or a coroutine function"),
    ("async def f(response, answer):\n    return 1.0\n",
     "'bad_verifier:f' must be a function returning a number, not a class, a generator or a coroutine function"),
])
def test_a_verifier_that_fails_at_import_or_is_not_a_function_is_refused(folders, tmp_path, capsys, monkeypatch,
                                                                         source, message):
    import sys

    (tmp_path / "bad_verifier.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "bad_verifier", raising=False)
    doc = manifest(folders["qwen"], folders["data"], dataset={"path": str(folders["data"]),
                                                              "verifier": "bad_verifier:f"})
    [line] = refused(capsys, ["validate", "-f", write(tmp_path, doc)])
    assert line.startswith(f"spec.task.dataset.verifier: {message}"), line


def test_a_prompt_with_no_tokens_is_refused_before_and_during_the_run(folders):
    from types import SimpleNamespace

    from dcmdp.models.tokenizer import load_tokenizer
    from dcmdp.preflight import empty_prompts
    from dcmdp.tasks.base import Problem
    from dcmdp.tasks.prompt import PromptFormat

    tok = load_tokenizer(folders["qwen"])  # no BOS: an empty prompt has no token without a chat template
    with pytest.raises(ValueError, match="^spec.task: the prompt '' has no tokens once formatted"):
        PromptFormat().ids(tok, "")
    assert PromptFormat("tokenizer").ids(tok, "")  # the template's tokens
    task = SimpleNamespace(problems=lambda: [Problem("1+1=", "2"), Problem("", "0"), Problem("", "1")])
    spec = SimpleNamespace(dataset=object(), chat_template="none", system_prompt=None)
    assert empty_prompts(task, spec, tok) == [("spec.task.dataset.path", "2 of 3 prompts have no tokens once "
                                               "formatted (e.g. ''); give every prompt some text")]


def test_cluster_paths_are_not_checked_here(tmp_path, capsys):
    doc = manifest(tmp_path / "mounted-model", tmp_path / "mounted.jsonl")
    assert main(["validate", "-f", write(tmp_path, doc), "--cluster"]) == 0


def test_missing_paths_hint_at_the_cluster_flag(capsys):
    assert main(["validate", "-f", "examples/gpu-cluster.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[1] == "  spec.model.path: /models/Qwen3-1.7B does not exist"
    assert err[-1] == ("hint: paths are read on this machine; for a manifest whose paths are mounted in the "
                       "cluster's pods, use `dcmdp validate --cluster`")
    assert main(["validate", "--cluster", "-f", "examples/gpu-cluster.yaml"]) == 0


def test_helm_values_are_named_as_such(capsys):
    assert main(["validate", "-f", "examples/helm/gpu-values.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[1].startswith("  (file): these are Helm values for the dcmdp chart (runs/runDefaults), not a "
                             "DCMDPRun manifest: `helm template dcmdp helm/dcmdp -f examples/helm/gpu-values.yaml`")


def test_ranks_that_disagree_with_the_trainers_gpu_limit_are_refused(tmp_path, capsys):
    doc = manifest(tmp_path / "mounted-model", tmp_path / "mounted.jsonl")
    doc["spec"]["trainer"] = {"gpusPerReplica": 4, "template": {"resources": {"limits": {"nvidia.com/gpu": 2}}}}
    for flags in ([], ["--cluster"]):
        lines = refused(capsys, ["validate", "-f", write(tmp_path, doc), *flags])
        assert lines[0].startswith("spec.trainer.gpusPerReplica: 4 ranks per pod but the trainer template's "
                                   "nvidia.com/gpu limit is 2")


def test_pools_that_get_no_prompts_are_named_in_a_warning(tmp_path):
    doc = manifest(tmp_path / "mounted-model", tmp_path / "mounted.jsonl")
    doc["spec"]["algorithm"] = {"promptsPerStep": 2, "miniBatchSize": 2}
    doc["spec"]["rollout"] = {"pools": [{"name": n, "precision": "bf16"} for n in ("a", "b", "c", "d")]
                              + [{"name": "idle", "replicas": 0}]}
    found = check_inputs(parse_run(doc), cluster=True)
    assert found.warnings == ["spec.algorithm.promptsPerStep: 2 prompts per step for 4 pools with replicas: "
                              "pools c, d get no prompts, so they are never trained on or constrained"]


@pytest.mark.parametrize("argv, message", [
    (["run", "--threads", "-3"], "argument --threads: must be >= 0 (got -3)"),
    (["run", "--threads", "two"], "argument --threads: 'two' is not a whole number"),
    (["run", "--resume", "--overwrite"], "argument --overwrite: not allowed with argument --resume"),
    (["sweep", "--threads", "0"], "argument --threads: must be >= 1 (got 0)"),
    (["sweep", "--parallel", "-1"], "argument --parallel: must be >= 1 (got -1)"),
])
def test_bad_options_exit_2_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        main([argv[0], "-f", "examples/quickstart.yaml", *argv[1:]])
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", [
    ("dcmdp_trainer.__main__", ["--config", "x.yaml", "--out", "o", "--threads", "-3"],
     "argument --threads: must be >= 0 (got -3)"),
    ("dcmdp_trainer.__main__", ["--config", "x.yaml", "--out", "o", "--steps", "0"],
     "argument --steps: must be >= 1 (got 0)"),
    ("dcmdp_trainer.__main__", ["--config", "x.yaml", "--out", "o", "--port", "-1"],
     "argument --port: must be >= 0 (got -1)"),
    ("dcmdp_rollout.__main__", ["--trainer", "h:1", "--threads", "-3"], "argument --threads: must be >= 0 (got -3)"),
    ("dcmdp_rollout.__main__", ["--trainer", "h:1", "--replica", "-1"], "argument --replica: must be >= 0 (got -1)"),
    ("dcmdp_trainer.__main__", ["--config", "x.yaml", "--out", "o", "--port", "70000"],
     "argument --port: must be <= 65535 (got 70000)"),
    ("dcmdp_trainer.__main__", ["--config", "x.yaml", "--out", "o", "--metrics-port", "-2"],
     "argument --metrics-port: must be >= -1 (got -2)"),
    ("dcmdp_trainer.__main__", ["--config", "x.yaml", "--out", "o", "--threads", "99999999999999999999"],
     "argument --threads: must be <= 4096 (got 99999999999999999999)"),
    ("dcmdp_rollout.__main__", ["--trainer", "h:1", "--metrics-port", "70000"],
     "argument --metrics-port: must be <= 65535 (got 70000)"),
    ("dcmdp_rollout.__main__", ["--trainer", "h:1", "--give-up-after", "nan"],
     "argument --give-up-after: must be a finite number of seconds > 0 (got nan)"),
    ("dcmdp_rollout.__main__", ["--trainer", "h:1", "--give-up-after", "-1"],
     "argument --give-up-after: must be a finite number of seconds > 0 (got -1)"),
])
def test_the_images_entry_points_refuse_bad_numbers(module, argv, message, capsys):
    import importlib

    entry = importlib.import_module(module)
    with pytest.raises(SystemExit) as exit:
        entry.build_parser().parse_args(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err
