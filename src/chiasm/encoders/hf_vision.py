"""Any transformers vision tower (CLIP, SigLIP, DINOv2, ViT) by hub id or local folder.

The tower's hidden states at ``feature_layer`` are the features (LLaVA uses the
penultimate layer, -2). Leading class/register tokens are dropped so the rest is a grid.

Resize, crop and normalisation come from the tower's own image processor
(``preprocessor_config.json``). A folder without one is refused unless the config says
what to use (``normalize`` = "clip" | "imagenet" | "half", or ``mean`` and ``std``): a
silent default would feed the tower inputs it was never trained on. ``image_size`` other
than the tower's own needs a tower that interpolates its position embeddings
(``interpolate_pos_encoding = true``).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from chiasm.checkpointing import enable_module_checkpointing
from chiasm.config import EncoderConfig
from chiasm.encoders.base import ENCODERS, VisionEncoder
from chiasm.encoders.preprocessing import NORMALISATIONS, ImagePreprocessing, from_image_processor
from chiasm.sources import check_source, hub_errors

PREPROCESSOR_FILE = "preprocessor_config.json"


def _vision_part(model: nn.Module) -> nn.Module:
    """Dual towers (CLIPModel, SiglipModel) keep the image side in ``vision_model``."""
    return getattr(model, "vision_model", model)


@ENCODERS.register("hf-vision")
class HFVisionTower(VisionEncoder):
    grid_kind = "patch grid"
    OPTIONS: ClassVar[dict[str, Any]] = {
        "pretrained": bool, "normalize": Literal["clip", "imagenet", "half"], "mean": list[float],
        "std": list[float], "interpolate_pos_encoding": bool}

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if not cfg.source:
            raise ValueError("encoder 'hf-vision' needs `source`: a hub id or a local folder")
        source = check_source(cfg.source, "encoder 'hf-vision' source")
        remote = cfg.trust_remote_code
        with hub_errors(source, "vision tower"):
            config = AutoConfig.from_pretrained(source, trust_remote_code=remote)
        # Only the image side is kept, so only its config is needed to rebuild it.
        self.vision_config = getattr(config, "vision_config", config)
        if cfg.options.get("pretrained", True):
            with hub_errors(source, "vision tower"):
                model = AutoModel.from_pretrained(source, trust_remote_code=remote)
        else:
            model = AutoModel.from_config(self.vision_config, trust_remote_code=remote)
        self.tower = _vision_part(model)
        self.feature_layer = cfg.feature_layer
        missing = [k for k in ("hidden_size", "image_size", "patch_size") if not hasattr(self.vision_config, k)]
        if missing:
            raise ValueError(f"hf-vision reads ViT-style towers; {type(self.vision_config).__name__} from "
                             f"{cfg.source!r} has no {', '.join(missing)}")
        self.dim = int(self.vision_config.hidden_size)
        native = int(self.vision_config.image_size)
        self.image_size = int(cfg.image_size or native)
        self._interpolate = self.image_size != native
        if self._interpolate:
            self._check_interpolation(cfg, native)
        patch = int(self.vision_config.patch_size)
        if self.image_size % patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the tower's patch size {patch}")
        self._side = self.image_size // patch
        self.processor_config = _processor_dict(source)
        self._preprocessing = self._read_preprocessing(cfg, source, native)

    def _check_interpolation(self, cfg: EncoderConfig, native: int) -> None:
        takes = "interpolate_pos_encoding" in inspect.signature(self.tower.forward).parameters
        if not cfg.options.get("interpolate_pos_encoding", False) or not takes:
            how = ("set interpolate_pos_encoding = true in the encoder options" if takes
                   else f"{type(self.tower).__name__} cannot interpolate its position embeddings")
            raise ValueError(f"encoder image_size {cfg.image_size} differs from the tower's {native} px: "
                             f"leave image_size unset (or {native}), or {how}")

    def _read_preprocessing(self, cfg: EncoderConfig, source: str, native: int) -> ImagePreprocessing:
        opts = cfg.options
        explicit = _explicit_normalisation(opts)
        if self.processor_config is not None:
            with hub_errors(source, "vision tower"):
                # The PIL backend: the steps chiasm follows (and no torchvision needed to read them).
                proc = AutoImageProcessor.from_pretrained(source, backend="pil",
                                                          trust_remote_code=cfg.trust_remote_code)
            prep = from_image_processor(proc)
            if explicit is not None:
                prep.mean, prep.std = explicit
        elif explicit is not None:
            prep = ImagePreprocessing(size=(native, native), mean=explicit[0], std=explicit[1],
                                      extra={"from": "encoder options"})
        else:
            raise ValueError(
                f"vision tower {cfg.source!r} has no {PREPROCESSOR_FILE}, so its resize and normalisation are "
                f"unknown; add the tower's image processor to the folder, or set the encoder option "
                f"normalize = \"clip\" | \"imagenet\" | \"half\" (or mean = [...], std = [...])")
        prep.pad_to_square = bool(opts.get("pad_to_square", False))
        if prep.output_size != (native, native) and not self._interpolate:
            raise ValueError(f"the tower's image processor gives {prep.output_size or 'image-dependent'} pixels, "
                             f"but the tower takes {native} x {native}")
        return prep.resized_to(self.image_size) if self._interpolate else prep

    def grid(self) -> tuple[int, int]:
        return self._side, self._side

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        out = self.tower(pixel_values=pixels, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[self.feature_layer]
        n_grid = self._side * self._side
        extra = hidden.shape[1] - n_grid
        if extra < 0 or (extra and math.isqrt(hidden.shape[1] - extra) ** 2 != n_grid):
            raise ValueError(f"tower returned {hidden.shape[1]} tokens, expected {n_grid} (+ class tokens)")
        return hidden[:, extra:]

    def enable_checkpointing(self) -> bool:
        return enable_module_checkpointing(self.tower) > 0

    def blocks(self) -> list[nn.Module]:
        encoder = getattr(self.tower, "encoder", None)
        layers = getattr(encoder, "layers", None) or getattr(encoder, "layer", None)
        if layers is None:
            raise NotImplementedError("this tower does not expose encoder layers")
        return list(layers)

    def export(self, folder: Path) -> None:
        """The tower's (vision) config and image processor config: enough to rebuild it offline."""
        folder.mkdir(parents=True, exist_ok=True)
        self.vision_config.save_pretrained(folder)
        if self.processor_config is not None:
            (folder / PREPROCESSOR_FILE).write_text(json.dumps(self.processor_config, indent=2) + "\n")


def _explicit_normalisation(opts: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    named, mean, std = opts.get("normalize"), opts.get("mean"), opts.get("std")
    if named is not None and (mean is not None or std is not None):
        raise ValueError("give either normalize or mean/std, not both")
    if (mean is None) != (std is None):
        raise ValueError("mean and std go together: set both")
    if named is not None:
        return NORMALISATIONS[named]
    return (tuple(mean), tuple(std)) if mean is not None else None


def _processor_dict(source: str) -> dict[str, Any] | None:
    """The tower's image processor config as saved, or None where it has none."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        with hub_errors(source, "vision tower"):
            data, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError):
        return None
    return data or None
