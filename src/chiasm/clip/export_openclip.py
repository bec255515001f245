"""Export a chiasm CLIP to open_clip's local-folder format.

The from-scratch towers use open_clip's parameter layout, so the export copies tensors under
open_clip's names and writes ``open_clip_config.json`` (``model_cfg``: the ViT and text
transformer sizes, pooling at the end token; ``preprocess_cfg``: size, mean, std) beside
``open_clip_model.safetensors`` and the tokenizer as a transformers tokenizer. open_clip then
loads it with ``create_model_and_transforms("local-dir:OUT")`` and ``get_tokenizer("local-dir:OUT")``.

Towers built on a pretrained trunk (an EfficientNet, a transformers text encoder) are not
exported: open_clip wraps such trunks in its own timm / HF classes with other layouts and
poolers, so the same weights would not give the same embeddings.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from chiasm.clip.model import ClipModel
from chiasm.clip.tokenizer import EOS, PAD, UNK
from chiasm.clip.towers import TextTransformerTower, ViTImageTower


class NotExportable(ValueError):
    """The model has a tower open_clip cannot rebuild with the same weights and outputs."""


def open_clip_config(model: ClipModel) -> dict:
    cfg = model.config
    i, t = cfg.image, cfg.text
    text_cfg = {"context_length": t.context_length, "vocab_size": model.tokenizer.vocab_size, "width": t.width,
                "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "pool_type": "eos",
                "eos_id": model.tokenizer.eos_id, "pad_id": model.tokenizer.pad_id,
                "hf_tokenizer_name": "local"}  # any name: open_clip reads a local-dir's tokenizer from the folder
    model_cfg = {"embed_dim": cfg.embed_dim,
                 "vision_cfg": {"image_size": i.image_size, "patch_size": i.patch_size, "width": i.width,
                                "layers": i.layers, "head_width": i.head_width, "mlp_ratio": i.mlp_ratio},
                 "text_cfg": text_cfg}
    if model.logit_bias is not None:
        model_cfg["init_logit_bias"] = float(model.logit_bias.detach())
    return {"model_cfg": model_cfg,
            "preprocess_cfg": {"size": i.image_size, "mean": list(i.mean), "std": list(i.std),
                               "interpolation": "bicubic", "resize_mode": "squash"}}


def open_clip_state(model: ClipModel) -> dict:
    """The model's tensors under open_clip's ``CLIP`` names."""
    out = {}
    for name, value in model.state_dict().items():
        if name.startswith("text."):
            name = name[len("text."):]
        out[name] = value.detach().contiguous()
    return out


def export_open_clip(model: ClipModel, out: str | Path) -> Path:
    if not isinstance(model.visual, ViTImageTower) or not isinstance(model.text, TextTransformerTower):
        raise NotExportable(
            "only models whose towers are both chiasm's from-scratch ViT and text transformer export to "
            "open_clip; a pretrained trunk (model.image.kind = 'encoder' or model.text.kind = 'hf') is wrapped by "
            "open_clip's own timm/HF classes, whose layout and pooling differ, so the model stays in chiasm's format")
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(open_clip_config(model), indent=2) + "\n")
    save_file(open_clip_state(model), str(out / "open_clip_model.safetensors"))
    tok = PreTrainedTokenizerFast(tokenizer_object=model.tokenizer.backend, pad_token=PAD, unk_token=UNK,
                                  eos_token=EOS, model_max_length=model.config.text.context_length)
    tok.save_pretrained(out)
    return out
