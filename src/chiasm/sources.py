"""Where pretrained parts come from: a local folder or a hub id, and errors that say which.

transformers treats any string that is not an existing folder as a hub id, so a mistyped
local path comes back as a complaint about a malformed repository name, and a hub id on a
machine without network as a connection error deep in huggingface_hub. Both are turned
here into a sentence that names the problem and the fix, and so is a local folder that is not
a checkpoint (no config.json, corrupt weights), and one whose config needs Python code shipped
with the model (transformers' message names a hub URL even for a folder, and an argument the
user never passes: the config option is what they can change).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from chiasm.errors import ModelFolderError


def looks_like_path(source: str) -> bool:
    """A source written as a path (absolute, relative with ./ or ../, ~, or with a separator)."""
    return (source.startswith(("/", "./", "../", "~")) or os.sep in source
            or (os.altsep is not None and os.altsep in source)) and not _hub_like(source)


def _hub_like(source: str) -> bool:
    """``owner/name`` with exactly one separator and no leading dot or slash: a hub id."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~"))
            and not Path(source).exists())


def check_source(source: str, what: str) -> str:
    """``source`` itself, or FileNotFoundError "folder not found" when it is a path that does not exist."""
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what}: folder not found: {source}")
        return str(path)
    return source


@contextmanager
def hub_errors(source: str, what: str, section: str) -> Iterator[None]:
    """Turn a failed hub lookup of ``source`` into an error that says how to use a local copy.

    ``section`` is the config table that names ``source`` (e.g. ``[model.lm]``), where the
    remedy for a model that needs its own code goes.
    """
    try:
        yield
    except (OSError, ValueError, SafetensorError) as exc:
        if "trust_remote_code" in str(exc):
            raise ModelFolderError(
                f"{what} {source}: its config needs Python code that comes with the model (auto_map), and chiasm "
                f"runs such code only when asked; if you trust that code, set trust_remote_code = true under "
                f"{section}") from None
        if Path(source).expanduser().exists():  # a local folder that is not a (complete) checkpoint
            raise ModelFolderError(f"{what} {source}: cannot load it from this folder: {exc}") from exc
        if isinstance(exc, ValueError):  # e.g. a name that is no valid hub id either
            raise ModelFolderError(f"{what} {source!r} is not a local folder, nor usable as a hub id: {exc}") from exc
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or "offline" in str(exc).lower() \
            or "connect" in str(exc).lower()
        why = "no network access to the Hugging Face hub" if offline else "the hub could not serve it"
        raise FileNotFoundError(
            f"{what} {source!r} is not a local folder and could not be fetched ({why}: "
            f"{str(exc).splitlines()[0]}). Download it once where a network exists "
            f"(`hf download {source} --local-dir DIR`, or huggingface_hub.snapshot_download({source!r}, "
            f"local_dir=DIR)), copy DIR here and set the source to that folder; a copy already in the hub cache "
            f"loads by its id with HF_HUB_OFFLINE=1") from None
