"""Export a run's trained weights as a Hugging Face model folder (``dcmdp export``).

A run folder ``OUT`` holds the starting model (``OUT/model``: config, tokenizer, safetensors,
written when the run starts) and the trainer's checkpoints (``OUT/checkpoints/step-N.pt``: weights,
optimizer, multipliers, RNGs; see :mod:`dcmdp_trainer.checkpoint`). :func:`export_run` writes the
weights of one checkpoint — the newest intact one, or ``step`` — as a folder that
``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM load and ``huggingface-cli upload``
publishes: ``OUT/model``'s tokenizer and other non-weight files, the config with the exported
dtype, the weights as safetensors (sharded above 5 GB, with its index), written by transformers'
``save_pretrained``, and ``dcmdp_export.json`` naming the run, step, checkpoint and its sha256.

The run's prompts are part of the model: the export's tokenizer turns a prompt's text into the ids
the run trained on (:mod:`dcmdp.tasks.prompt`). With ``spec.task.chatTemplate: none`` those are
``[BOS] + tokens``, so a tokenizer that adds no BOS by itself (the built-in character tokenizer,
some Hub ones) gets a post-processor that does: ``tokenizer(text)`` — what transformers and vLLM's
completion API call — then gives the training ids (a model asked without its BOS answered nothing
right: held-out accuracy 0.0 against 0.945 with it). With ``tokenizer``, the chat template is the
format (vLLM's chat API and ``apply_chat_template`` render it as training did). The record says
which (``prompt_format``), with the system prompt the run used, which a caller must send itself.

The checkpoint is verified (size and sha256 against its record) and memory-mapped: the optimizer
state is never read. Each weight is cast to ``dtype`` (``auto``: the starting model's
``torch_dtype``, else fp32) and checked: a value that is not finite after the cast is an error
naming the tensor, its largest magnitude and the dtype, and nothing is written. The folder is
written under a temporary name beside ``to`` (``.NAME.*``, holding a lock file the exporting
process keeps locked) and renamed into place, so ``to`` is either complete or absent. An export
killed midway leaves its temporary folder (a partial model: gigabytes); the next export to the same
``to`` deletes every such folder whose lock no process holds any more (the kernel drops a killed
process's ``flock``) and says so in its notes; a folder of an export still running is left alone. A non-empty ``to`` is
replaced only with ``overwrite`` and only when it is an earlier export (it holds
``dcmdp_export.json``); ``to`` may not be the run folder, lie inside it or hold it, be a file or a
symbolic link. Every refusal and failure is an :class:`ExportError` naming the cause.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dcmdp.precision import TORCH_DTYPES
from dcmdp.spec import TaskSpec
from dcmdp.tasks.prompt import PromptFormat, encode, prompt_format
from dcmdp_trainer import checkpoint

# Files of OUT/model that are weights (rewritten from the checkpoint), never copied.
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")
DTYPES = ("auto", "bf16", "fp16", "fp32")
MARKER = "dcmdp_export.json"  # what an export folder holds: the only kind ``overwrite`` replaces
LOCK = ".dcmdp-export.lock"  # in an export's temporary folder, locked while the export runs


class ExportError(RuntimeError):
    """The run folder, checkpoint, destination or a weight cannot be exported; the message says which."""


@dataclass(frozen=True)
class ExportResult:
    folder: str
    step: int
    version: int
    checkpoint: str
    sha256: str
    dtype: str
    parameters: int
    bytes: int
    skipped: tuple[str, ...] = ()  # why each newer checkpoint was passed over
    prompt_format: dict = field(default_factory=dict)  # how a caller formats prompts as the run did
    notes: tuple[str, ...] = ()  # what a caller must know (printed as warnings)


def _checkpoint(out: Path, step: Optional[int]) -> tuple[Path, dict, list[str]]:
    """(the checkpoint, its state memory-mapped, why each newer one was skipped)."""
    if step is None:
        found, skipped = checkpoint.candidates(out), []
        if not found:
            raise ExportError(f"{out}: no checkpoint in {checkpoint.checkpoint_dir(out)} (a run writes its last "
                              "checkpoint when it ends)")
        for path in found:
            try:
                return path, checkpoint.read(path, mmap=True), skipped
            except checkpoint.CheckpointError as exc:
                skipped.append(str(exc))
        raise ExportError(f"no intact checkpoint in {checkpoint.checkpoint_dir(out)}: " + "; ".join(skipped))
    path = checkpoint.checkpoint_dir(out) / f"step-{step:08d}.pt"
    if step < 0 or not path.is_file():
        have = sorted(int(p.stem.split("-")[1]) for p in checkpoint.candidates(out))
        raise ExportError(f"--step {step}: no checkpoint of that step in {checkpoint.checkpoint_dir(out)} "
                          f"(steps there: {have or 'none'})")
    try:
        return path, checkpoint.read(path, mmap=True), []
    except checkpoint.CheckpointError as exc:
        raise ExportError(str(exc)) from None


def _check_destination(out: Path, to: Path, overwrite: bool) -> None:
    """Refuse a ``to`` that would destroy what is not an earlier export (see :func:`export_run`)."""
    if to.is_symlink():
        raise ExportError(f"--to {to} is a symbolic link: give the folder itself")
    run, dest = out.resolve(), to.resolve()
    if dest == run or run in dest.parents or dest in run.parents:
        raise ExportError(f"--to {to}: is the run folder {out}, inside it, or holds it")
    if dest.exists() and not dest.is_dir():
        raise ExportError(f"--to {to} is a file, not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not overwrite:
            raise ExportError(f"--to {to} exists and is not empty; pass --overwrite to replace an earlier export")
        if not (dest / MARKER).is_file():
            raise ExportError(f"--to {to} holds files and no {MARKER}: not an earlier export, not replaced")


def _lock(folder: Path):
    """An exclusive ``flock`` on ``folder``'s lock file (the open file: the lock lasts while it
    does, and the kernel drops it when the process dies, however it dies). The file is locked
    under another name, then renamed: a cleaner never sees it unlocked while this export lives."""
    f = open(folder / (LOCK + ".new"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(folder / (LOCK + ".new"), folder / LOCK)
    except OSError:
        f.close()
        raise
    return f


def _remove_leftovers(to: Path) -> list[str]:
    """Delete the temporary folders of exports to ``to`` that were killed midway: ``.NAME.XXXXXXXX``
    beside ``to`` holding a lock file nobody holds. Returns a note per folder deleted or that could
    not be (empty: none). A folder without the lock file (an export that has just created it, or an
    older dcmdp's) and one whose lock is held (an export running now) are left alone. The lock
    file goes last, so a deletion that fails midway (a read-only file system) is retried by the
    next export; symbolic links are removed, never followed."""
    notes = []
    pattern = re.compile(re.escape(f".{to.name}.") + r"[A-Za-z0-9_]{8}")
    try:
        beside = list(to.parent.iterdir()) if to.parent.is_dir() else []
    except OSError:
        return notes
    for d in beside:
        if pattern.fullmatch(d.name) and not d.is_symlink() and d.is_dir() and (d / LOCK).is_file():
            note = _delete_leftover(d)
            if note:
                notes.append(note)
    return notes


def _delete_leftover(d: Path) -> Optional[str]:
    """Delete the leftover folder ``d`` unless an export holds its lock: the lock file last, so a
    deletion that fails midway is retried. A note of what happened, or None (held, or gone)."""
    try:
        fd = os.open(d / LOCK, os.O_RDWR)  # (never created here: an export that has just unlinked it keeps its folder)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # (raises while an export holds it)
    except OSError:
        os.close(fd)
        return None
    why = "left by an export to the same folder that was killed midway"
    try:
        size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file() and not p.is_symlink())
        for child in d.iterdir():
            if child.name == LOCK:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        (d / LOCK).unlink()
        d.rmdir()
    except OSError as exc:
        return f"could not delete {d}, {why}: {exc.strerror or exc}"
    finally:
        os.close(fd)
    return f"deleted {d} ({size / 2**20:.0f} MiB): {why}"


def _install(tmp: Path, to: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder ``tmp`` to ``to``: an earlier export there (``overwrite``) is moved
    aside first and deleted after, so ``to`` is never a mix; rules checked again (``to`` may have
    appeared meanwhile)."""
    _check_destination(out, to, overwrite)
    aside = None
    if to.is_dir() and any(to.iterdir()):
        aside = Path(tempfile.mkdtemp(prefix=f".{to.name}.old.", dir=to.parent))
        os.rename(to, aside / "export")
    try:
        os.rename(tmp, to)  # (fails if another export filled ``to`` meanwhile)
    except OSError as exc:
        if aside is not None and not to.exists():
            os.rename(aside / "export", to)  # put the earlier export back
        raise ExportError(f"--to {to}: written meanwhile by someone else ({exc.strerror}); nothing replaced") from None
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _target_dtype(dtype: str, config) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if dtype != "auto":
        return getattr(torch, TORCH_DTYPES[dtype])
    named = getattr(config, "dtype", None)  # (transformers ≥ 5; ``torch_dtype`` before)
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) and named.is_floating_point else torch.float32


def cast_weights(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of ``weights`` cast to ``dtype`` (others as they are).

    Raises :class:`ExportError` naming the first tensor that is not finite after the cast, with its
    largest finite magnitude before it and the dtype (an fp16 cast overflows above 65504)."""
    out = {}
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            raise ExportError(f"checkpoint weight {name!r} is not a tensor ({type(t).__name__})")
        c = t.to(dtype) if t.is_floating_point() else t
        if c.is_floating_point() and not torch.isfinite(c).all():
            big = t.float().abs().nan_to_num(nan=0.0, posinf=0.0).max().item()
            raise ExportError(f"weight {name}: not finite after the cast to {str(dtype).removeprefix('torch.')} "
                              f"(largest magnitude {big:.6g}); choose another --dtype")
        out[name] = c
    return out


PROBE = "1+2=?"  # a prompt text whose tokenization is compared with training's


def _run_prompt_format(out: Path) -> tuple[str, Optional[PromptFormat]]:
    """(the run's name, its prompt format) from ``OUT/run.json`` (("", None) when it is missing or
    its task cannot be read: a folder written by another version). Only ``metadata.name`` and
    ``spec.task`` are read (a pod template the cluster's policy would refuse does not matter here)."""
    try:
        data = json.loads((out / "run.json").read_text())
        name = str(data.get("metadata", {}).get("name", ""))
        task = TaskSpec.model_validate(data.get("spec", {}).get("task", {}), by_name=False)
    except (OSError, ValueError, AttributeError, TypeError):  # (pydantic's ValidationError is a ValueError)
        return "", None
    return name, prompt_format(task)


def _match_training_prompts(folder: Path, fmt: Optional[PromptFormat]) -> tuple[dict, list[str]]:
    """Make the tokenizer in ``folder`` encode a prompt's text as the run did (see the module
    docstring), rewriting its files when a BOS post-processor is needed. (the record's
    ``prompt_format``, notes for the caller)."""
    # optional and heavy (the ml extra), as everywhere in the trainer
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    if fmt is None:
        return {}, ["the run's spec (run.json) is missing or unreadable: check how its prompts were formatted"]
    record: dict = {"chat_template": fmt.chat_template, "system_prompt": fmt.system_prompt}
    notes = []
    if fmt.chat_template != "none":
        record["use"] = "the tokenizer's chat template with the generation prompt (no special tokens added)"
        if fmt.system_prompt is not None:
            notes.append(f"the run used a system prompt ({fmt.system_prompt[:80]!r}): send it with every chat")
        return record, notes
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    want = fmt.ids(tok, PROBE)
    got = list(tok(PROBE)["input_ids"])
    if got != want and tok.bos_token_id is not None and got == encode(tok, PROBE) and tok.is_fast:
        bos = tok.bos_token
        tok.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.bos_token_id)])
        tok.save_pretrained(str(folder))
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        got = list(tok(PROBE)["input_ids"])
    record["bos"] = tok.bos_token_id is not None
    if got == want:
        record["use"] = "the plain text: tokenizer(text) gives the ids the run trained on"
    else:
        record["use"] = "token ids: [BOS] + tokenizer(text, add_special_tokens=False)"
        notes.append(f"the tokenizer encodes {PROBE!r} as {got[:12]}, the run trained on {want[:12]}: give prompts "
                     "as token ids ([BOS] + the text's tokens without special tokens)")
    return record, notes


def export_run(out: Path, to: Path, *, step: Optional[int] = None, dtype: str = "auto",
               overwrite: bool = False) -> ExportResult:
    """Write the weights of run folder ``out``'s checkpoint (``step``, or the newest intact one) as
    a Hugging Face model folder ``to`` (see the module docstring). Raises :class:`ExportError`."""
    # optional and heavy (the ml extra), as everywhere in the trainer
    from transformers import AutoConfig, AutoModelForCausalLM

    out, to = Path(out), Path(to)
    model_dir = out / "model"
    if not out.is_dir():
        raise ExportError(f"{out}: no such folder (give the run's --out folder)")
    if not (model_dir / "config.json").is_file():
        raise ExportError(f"{out}: no starting model in {model_dir} (config.json missing): not a dcmdp run folder?")
    if not str(to).strip() or str(to) == ".":
        raise ExportError("--to: give the folder to write")
    _check_destination(out, to, overwrite)
    path, state, skipped = _checkpoint(out, step)
    weights = (state.get("learner") or {}).get("model")
    if not isinstance(weights, dict) or not weights:
        raise ExportError(f"{path.name}: holds no model weights")

    config = AutoConfig.from_pretrained(str(model_dir))
    target = _target_dtype(dtype, config)
    cast = cast_weights(weights, target)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    try:
        model.load_state_dict(cast, strict=True, assign=True)
    except RuntimeError as exc:  # missing/unexpected keys or shapes: not this model's checkpoint
        why = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise ExportError(f"{path.name} does not fit the model in {model_dir}: {why[:800]}") from None
    if getattr(config, "tie_word_embeddings", False):
        head, embed = weights.get("lm_head.weight"), model.get_input_embeddings().weight
        if head is not None and (head.shape != embed.shape or not torch.equal(head.to(embed.dtype), embed)):
            raise ExportError(f"{path.name}: lm_head.weight differs from the input embedding, but the model's config "
                              "ties them (tie_word_embeddings): the export would silently drop lm_head")
        model.tie_weights()
    model.config.dtype = target

    leftovers = _remove_leftovers(to)
    try:
        to.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    except OSError as exc:
        raise ExportError(f"--to {to}: cannot write beside it ({exc.strerror or exc})") from None
    try:
        held = _lock(tmp)
    except OSError as exc:  # (a file system without flock)
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"--to {to}: cannot lock {tmp / LOCK} ({exc.strerror or exc})") from None
    try:
        for f in model_dir.iterdir():  # tokenizer, generation config, chat template…
            if f.is_file() and not any(f.match(p) for p in WEIGHT_FILES):
                shutil.copy2(f, tmp / f.name)
        model.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="5GB")
        run_name, fmt = _run_prompt_format(out)
        prompts, notes = _match_training_prompts(tmp, fmt)
        record = json.loads(checkpoint.record_path(path).read_text())
        params = sum(p.numel() for p in model.parameters())  # (tied weights once)
        nbytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        result = ExportResult(str(to), int(state.get("step", -1)), int(state.get("version", -1)), path.name,
                              str(record.get("sha256", "")), str(target).removeprefix("torch."), params, nbytes,
                              tuple(skipped), prompts, tuple(leftovers + notes))
        fields = {k: v for k, v in asdict(result).items() if k not in ("folder", "skipped", "notes")}
        (tmp / MARKER).write_text(json.dumps({"run": run_name, **fields}, indent=2))
        (tmp / LOCK).unlink()  # (still held: a cleaner finds no lock file and leaves the folder alone)
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():  # (mkdtemp and the safetensors writer make them private)
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        _install(tmp, to, out, overwrite)
    except OSError as exc:  # a full disk, a folder that became read-only…
        raise ExportError(f"--to {to}: cannot write it ({exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # (gone already once installed)
        held.close()
    return result
