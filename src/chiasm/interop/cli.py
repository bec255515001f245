"""What ``chiasm import`` and ``chiasm export`` do, checked before any weight is read or written."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path


def _fresh_folder(out: str | Path, what: str) -> Path:
    """``out`` as a folder to write into: new or empty, so that no file of an earlier checkpoint stays beside."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{what} {out} exists and is not an empty folder; choose a new folder or remove it")
    return out


def import_checkpoint(src: str | Path, out: str | Path, *, fmt: str = "llava", dtype: str | None = None) -> Path:
    """Read the ``fmt`` checkpoint ``src`` and save it as a chiasm model folder ``out``."""
    from chiasm.interop.llava import import_llava

    if fmt != "llava":
        raise ValueError(f"unknown import format {fmt!r}; known: llava")
    out = _fresh_folder(out, "output folder")
    model = import_llava(src, dtype=dtype)
    # Evaluation compares the LM with its base LM (language retention): the imported one, saved in OUT/lm.
    model.config = replace(model.config, lm=replace(model.config.lm, source=str(out.resolve() / "lm")))
    return model.save(out)


def export_model(model_dir: str | Path, out: str | Path, *, fmt: str = "hf") -> Path:
    """Load the chiasm model folder ``model_dir`` and write it as a ``fmt`` checkpoint into ``out``."""
    from chiasm.interop.export_hf import export_llava
    from chiasm.model import VisionLanguageModel

    if fmt != "hf":
        raise ValueError(f"unknown export format {fmt!r}; known: hf")
    out = _fresh_folder(out, "output folder")
    return export_llava(VisionLanguageModel.load(model_dir), out)
