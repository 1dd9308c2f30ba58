"""Where a loaded model's folder comes from: ``spec.model.path`` or a Hub id in ``spec.model.name``.

A Hub id is resolved through huggingface_hub's cache (``snapshot_download``): the cached snapshot
when it is there (no network), else a download when online. Offline with nothing cached is an error
naming the field, never a silent fallback to another model.
"""

from __future__ import annotations

from pathlib import Path

from dcmdp.spec import ModelSpec

# Files a causal LM needs; weights in safetensors only (no pickled .bin is executed).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


class ModelSourceError(FileNotFoundError):
    """The model folder named by ``spec.model.path`` / ``spec.model.name`` cannot be had."""


def resolve_model_folder(spec: ModelSpec, *, allow_download: bool = True) -> Path:
    """The local folder of a loaded model (``path``, or the cached snapshot of ``name``).

    Raises :class:`ModelSourceError` naming the field when the folder is missing, has no
    ``config.json``, or the Hub id is neither cached nor downloadable (offline).
    """
    if spec.path:
        folder = Path(spec.path)
        if not (folder / "config.json").is_file():
            what = "does not exist" if not folder.exists() else "has no config.json"
            raise ModelSourceError(f"spec.model.path: {folder} {what} (a local Hugging Face model folder is needed)")
        return folder
    if not spec.name:
        raise ValueError("resolve_model_folder: spec.model has neither path nor name")
    # optional (the ml extra): only a model named by its Hub id needs it
    from huggingface_hub import snapshot_download

    where = f"{spec.name}" + (f"@{spec.revision}" if spec.revision else "")
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision, allow_patterns=HUB_FILES,
                                      local_files_only=True))
    except Exception as cached_exc:  # noqa: BLE001 - not in the cache: try the Hub if allowed
        if not allow_download:
            raise ModelSourceError(f"spec.model.name: {where} is not in the Hugging Face cache "
                                   f"({type(cached_exc).__name__})") from None
    try:
        return Path(snapshot_download(spec.name, revision=spec.revision, allow_patterns=HUB_FILES))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated model: all end here
        raise ModelSourceError(
            f"spec.model.name: cannot get {where} from the Hugging Face Hub and it is not cached "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Download it where the "
            "Hub is reachable (huggingface-cli download), mount the cache (HF_HOME), or use model.path."
        ) from None
