"""What a run needs beyond its manifest, checked before it starts (``dcmdp validate``, ``dcmdp run``).

The spec model checks the manifest alone. These checks load what the manifest points to, as the
run will, and report what the run would otherwise refuse only once started (with a traceback at
start-up, or mid-run at the first reward of a bad reference):

* local paths exist (``spec.model.path``, ``spec.task.dataset.path``);
* the tokenizer loads and has an EOS token (``spec.model``);
* a loaded model's ``config.json`` names an architecture transformers builds as a causal LM
  (``spec.model``): its ``model_type`` is known, and no custom code is needed;
* every prompt, formatted as the run formats it, has at least one token (``spec.task``);
* the task builds: every dataset line is a JSON object with ``prompt`` and ``answer``, at least
  two problems, a user verifier imports (``spec.task.dataset.*``);
* the chat template the task asks for exists (``spec.task.chatTemplate``);
* with the ``math`` verifier, every reference answer holds a final answer math-verify can read;
* (a warning) reference answers longer than ``maxNewTokens``, which no response can reproduce.

A Hub model (``spec.model.name``) not yet in the cache is not downloaded here: its tokenizer
checks are skipped with a warning (the run downloads it). Without the ML extra (no transformers)
only the paths are checked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dcmdp import ranks
from dcmdp.models.source import ModelSourceError, resolve_model_folder
from dcmdp.models.tokenizer import build_tokenizer, load_tokenizer
from dcmdp.spec import DCMDPRun
from dcmdp.tasks import build_task
from dcmdp.tasks.base import Problem
from dcmdp.tasks.math_answer import reference_answer
from dcmdp.tasks.prompt import prompt_format

_FIELD = re.compile(r"^(spec(?:\.[A-Za-z]+)+): (.*)$", re.S)


@dataclass
class Findings:
    """``problems``: (field, what is wrong), each of which the run would refuse; ``warnings``: text."""

    problems: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check_paths(run: DCMDPRun) -> list[tuple[str, str]]:
    """(field, problem) for each local path of the spec that does not exist (relative paths are read
    from the current folder, as ``dcmdp run`` reads them)."""
    problems = []
    model, task = run.spec.model, run.spec.task
    if model.path and not (Path(model.path) / "config.json").is_file():
        what = "does not exist" if not Path(model.path).exists() else "has no config.json"
        problems.append(("spec.model.path", f"{model.path} {what}"))
    if task.dataset and not Path(task.dataset.path).is_file():
        problems.append(("spec.task.dataset.path", f"no such file: {task.dataset.path}"))
    return problems


def starved_pools(run: DCMDPRun) -> list[str]:
    """Pools with replicas that get no prompt in a step: the prompts are shared in proportion to
    replicas (``dcmdp_trainer/work_split.py``), so with fewer ``promptsPerStep`` than such pools the
    last ones are never trained on, and their tolerance constrains nothing."""
    active = [p.name for p in run.spec.rollout.pools if p.replicas > 0]
    prompts = run.spec.algorithm.prompts_per_step
    if len(active) <= prompts:
        return []
    return [f"spec.algorithm.promptsPerStep: {prompts} prompts per step for {len(active)} pools with replicas: "
            f"pools {', '.join(active[prompts:])} get no prompts, so they are never trained on or constrained"]


def check_inputs(run: DCMDPRun, *, cluster: bool = False) -> Findings:
    """Every check of the module docstring. ``cluster``: the paths are mounted in the pods, so a
    path missing here is no problem (and nothing behind it can be checked)."""
    mismatch = ranks.gpus_mismatch(run.spec.trainer)
    gpus = [(ranks.GPUS_FIELD, mismatch)] if mismatch else []
    missing = check_paths(run)
    if missing:
        return Findings(gpus + ([] if cluster else missing), starved_pools(run))
    out = Findings(list(gpus), starved_pools(run))
    spec = run.spec
    tokenizer: Optional[Any] = None
    model_field = "spec.model.path" if spec.model.path else "spec.model.name"
    try:
        if spec.model.loaded:
            folder = resolve_model_folder(spec.model, allow_download=False)
            why = architecture_problem(folder)  # config.json first: the tokenizer reads it too
            if why:
                out.problems.append((model_field, why))
            else:
                tokenizer = load_tokenizer(folder)
        else:
            tokenizer = build_tokenizer()
    except ImportError:  # the core without transformers: nothing to load a tokenizer or a task with
        return out
    except ModelSourceError as exc:
        if spec.model.path:
            out.problems.append(_field_of(exc, "spec.model.path"))
        else:
            out.warnings.append(f"tokenizer not checked: {exc}")
    except Exception as exc:  # noqa: BLE001 - no EOS, an unreadable tokenizer: any error is the finding
        out.problems.append(_field_of(exc, "spec.model") if isinstance(exc, ValueError) and _FIELD.match(str(exc))
                            else (model_field, f"the tokenizer does not load: {_first_line(exc)}"))
    try:
        task = build_task(spec.task)
    except (OSError, ValueError) as exc:  # malformed lines, too few problems, a verifier that does not import
        out.problems.append(_field_of(exc, "spec.task"))
        return out
    if tokenizer is not None:
        try:
            prompt_format(spec.task).text(tokenizer, task.held_out()[0].prompt)
        except ValueError as exc:
            out.problems.append(_field_of(exc, "spec.task.chatTemplate"))
        else:
            out.problems += empty_prompts(task, spec.task, tokenizer)
    if spec.task.dataset is not None:
        problems = task.problems()
        if spec.task.dataset.verifier == "math":
            out.problems += unreadable_references(problems)
        if tokenizer is not None:
            out.warnings += long_answers(problems, tokenizer, task.max_new_tokens)
    return out


def architecture_problem(folder: Path) -> Optional[str]:
    """Why transformers cannot build the model in ``folder`` as a causal LM (``AutoModelForCausalLM``,
    without custom code, as the run loads it), or None. Reads ``config.json`` only."""
    # optional and heavy (the ml extra): the core imports without it
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any error reading a user's config is the finding (transformers and
        # huggingface_hub raise OSError, ValueError, KeyError, TypeError, RecursionError or their own errors)
        return f"{folder}/config.json: transformers cannot read it (without custom code): {_first_line(exc)}"
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return (f"{folder}/config.json: model_type {config.model_type!r} has no causal-LM class in transformers "
                f"(architectures: {getattr(config, 'architectures', None)})")
    return None


def empty_prompts(task: Any, task_spec: Any, tokenizer: Any) -> list[tuple[str, str]]:
    """(field, which) when some prompts, formatted as the run formats them, have no token: the model
    would be asked to continue nothing. Checks the dataset's problems (all of them) or the built-in
    task's held-out set."""
    fmt = prompt_format(task_spec)
    problems = task.problems() if task_spec.dataset is not None else task.held_out()
    empty = [p for p in problems if not _has_tokens(fmt, tokenizer, p.prompt)]
    if not empty:
        return []
    where = "spec.task.dataset.path" if task_spec.dataset is not None else "spec.task"
    return [(where, f"{len(empty)} of {len(problems)} prompts have no tokens once formatted "
                    f"(e.g. {empty[0].prompt[:60]!r}); give every prompt some text")]


def unreadable_references(problems: list[Problem]) -> list[tuple[str, str]]:
    """(``spec.task.dataset.path``, how many and which) when the ``math`` verifier cannot read the
    final answer of some references: every response to them would fail the run at its reward."""
    try:
        bad = [p for p in problems if not _readable(p.answer)]
    except ImportError:  # math-verify (the ml extra) is missing: the run cannot use the verifier either
        return []
    if not bad:
        return []
    return [("spec.task.dataset.path",
             f"{len(bad)} of {len(problems)} reference answers have no final answer the math verifier can read "
             f"(first: {bad[0].answer[-60:]!r}); end each with '#### <answer>' or \\boxed{{<answer>}}")]


def long_answers(problems: list[Problem], tokenizer: Any, limit: int) -> list[str]:
    """A warning when reference answers are longer (in tokens, EOS included) than ``limit``
    (``maxNewTokens``): a response can never reproduce them, so their reward is 0 every step."""
    long = [p for p in problems if len(tokenizer(p.answer, add_special_tokens=False)["input_ids"]) + 1 > limit]
    if not long:
        return []
    return [f"spec.task.maxNewTokens ({limit}): {len(long)} of {len(problems)} reference answers are "
            f"longer (first: {long[0].answer[:60]!r}); a response that long is cut off before EOS"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def _has_tokens(fmt: Any, tokenizer: Any, prompt: str) -> bool:
    try:
        return bool(fmt.ids(tokenizer, prompt))
    except ValueError:
        return False


def _readable(answer: str) -> bool:
    try:
        reference_answer(answer)
    except ValueError:
        return False
    return True


def _field_of(exc: Exception, default: str) -> tuple[str, str]:
    """(field, message) of an error whose message starts with the field it names, else ``default``."""
    m = _FIELD.match(str(exc))
    return (m.group(1), m.group(2)) if m else (default, str(exc))
