"""Any transformers vision tower (CLIP, SigLIP, SigLIP2, DINOv2, ViT) by hub id or local folder.

The tower's hidden states at ``feature_layer`` are the features (LLaVA uses the
penultimate layer, -2). Leading class/register tokens are dropped so the rest is a grid.
A dual checkpoint (a whole CLIPModel or SiglipModel) gives its image tower only: only that
part's weights are read, and only its config is saved with a model.

Resize, crop and normalisation come from the tower's own image processor
(``preprocessor_config.json``). A folder without one is refused unless the config says
what to use (``normalize`` = "clip" | "imagenet" | "half", or ``mean`` and ``std``): a
silent default would feed the tower inputs it was never trained on. ``image_size`` other
than the tower's own needs a tower that interpolates its position embeddings
(``interpolate_pos_encoding = true``). DINOv2 always interpolates them: its config's
``image_size`` (518) is the size of its position table, not the crop it takes (224 in its
processor), so the processor's crop is its size. SigLIP2 NaFlex towers run at one square
grid (see ``chiasm.encoders.naflex``).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.utils import logging as hf_logging

from chiasm.checkpointing import enable_module_checkpointing
from chiasm.config import EncoderConfig
from chiasm.encoders.base import ENCODERS, VisionEncoder
from chiasm.encoders.naflex import NAFLEX_TYPES, check_patch_size, naflex_inputs, naflex_side
from chiasm.encoders.preprocessing import NORMALISATIONS, ImagePreprocessing, from_image_processor
from chiasm.errors import ModelFolderError
from chiasm.sources import check_source, hub_errors

log = logging.getLogger(__name__)
PREPROCESSOR_FILE = "preprocessor_config.json"
SECTION = "[model.encoder]"
# Towers that resize their position embeddings to any input themselves (no option needed).
ALWAYS_INTERPOLATES = frozenset({"dinov2", "dinov2_with_registers"}) | NAFLEX_TYPES


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
        with hub_errors(source, "vision tower", SECTION):
            config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        # Only the image side is kept, so only its config is needed to rebuild it.
        self.vision_config = getattr(config, "vision_config", config)
        kind = getattr(self.vision_config, "model_type", "")
        missing = [k for k in ("hidden_size", "patch_size") if not hasattr(self.vision_config, k)]
        if missing:
            raise ValueError(f"hf-vision reads ViT-style towers; {type(self.vision_config).__name__} from "
                             f"{cfg.source!r} has no {', '.join(missing)}")
        self.tower = _vision_part(self._load_tower(cfg, source, dual=self.vision_config is not config))
        self.feature_layer = cfg.feature_layer
        self.dim = int(self.vision_config.hidden_size)
        self.patch = int(self.vision_config.patch_size)
        self._naflex = kind in NAFLEX_TYPES
        self.processor_config = _processor_dict(source)
        own = self._own_preprocessing(cfg, source)
        native = self._native_size(own, cfg)
        self.image_size = int(cfg.image_size or native)
        resized = self.image_size != native
        # The keyword a tower needs to run at another size than its own (never for those that always do).
        self._interpolate = resized and kind not in ALWAYS_INTERPOLATES
        if self._interpolate:
            self._check_interpolation(cfg, native)
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the tower's patch size {self.patch}")
        self._side = self.image_size // self.patch
        self._preprocessing = self._read_preprocessing(cfg, own, native, resized)

    def _load_tower(self, cfg: EncoderConfig, source: str, *, dual: bool) -> nn.Module:
        """The tower, in float32; from a dual checkpoint only its image side's weights are read."""
        remote = cfg.trust_remote_code
        if not cfg.options.get("pretrained", True):
            return AutoModel.from_config(self.vision_config, trust_remote_code=remote)
        extra = {"config": self.vision_config} if dual else {}
        with hub_errors(source, "vision tower", SECTION), _quiet(dual):
            model, info = AutoModel.from_pretrained(source, trust_remote_code=remote, dtype=torch.float32,
                                                    output_loading_info=True, **extra)
        # A head or pooler a checkpoint lacks is unused here; most of the tower missing means the
        # checkpoint's weight names did not fit this class, and the tower would run random weights.
        missing = info.get("missing_keys") or []
        if len(missing) > len(model.state_dict()) // 2:
            raise ModelFolderError(f"vision tower {source}: {len(missing)} of {type(model).__name__}'s "
                                   f"{len(model.state_dict())} weights are not in the checkpoint "
                                   f"(e.g. {sorted(missing)[0]}); it is not a checkpoint of this tower")
        if missing:
            log.warning("vision tower %s: %d weight(s) not in the checkpoint, left untrained: %s", source,
                        len(missing), ", ".join(sorted(missing)[:5]))
        return model

    def _own_preprocessing(self, cfg: EncoderConfig, source: str) -> ImagePreprocessing | None:
        """The tower's image processor as chiasm's steps, at the size it gives (None: the folder has none)."""
        if self.processor_config is None:
            return None
        with hub_errors(source, "vision tower", SECTION):
            # The PIL backend: the steps chiasm follows (and no torchvision needed to read them).
            proc = AutoImageProcessor.from_pretrained(source, backend="pil", trust_remote_code=cfg.trust_remote_code)
        if not self._naflex:
            return from_image_processor(proc)
        check_patch_size(self.processor_config, self.patch)
        side = naflex_side(self.processor_config, self.vision_config) * self.patch
        return from_image_processor(proc, fixed=(side, side))

    def _native_size(self, own: ImagePreprocessing | None, cfg: EncoderConfig) -> int:
        """The side in pixels the tower takes without being told otherwise."""
        kind = getattr(self.vision_config, "model_type", "")
        if self._naflex:
            return naflex_side(self.processor_config, self.vision_config) * self.patch
        out = own.output_size if own is not None else None
        if kind in ALWAYS_INTERPOLATES and out is not None and out[0] == out[1]:
            return out[0]
        if not hasattr(self.vision_config, "image_size"):
            raise ValueError(f"hf-vision: {type(self.vision_config).__name__} from {cfg.source!r} has no image_size")
        return int(self.vision_config.image_size)

    def _check_interpolation(self, cfg: EncoderConfig, native: int) -> None:
        takes = "interpolate_pos_encoding" in inspect.signature(self.tower.forward).parameters
        if not cfg.options.get("interpolate_pos_encoding", False) or not takes:
            how = ("set interpolate_pos_encoding = true in the encoder options" if takes
                   else f"{type(self.tower).__name__} cannot interpolate its position embeddings")
            raise ValueError(f"encoder image_size {cfg.image_size} differs from the tower's {native} px: "
                             f"leave image_size unset (or {native}), or {how}")

    def _read_preprocessing(self, cfg: EncoderConfig, own: ImagePreprocessing | None, native: int,
                            resized: bool) -> ImagePreprocessing:
        opts = cfg.options
        explicit = _explicit_normalisation(opts)
        if own is not None:
            prep = own
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
        if prep.output_size != (native, native) and not resized:
            raise ValueError(f"the tower's image processor gives {prep.output_size or 'image-dependent'} pixels, "
                             f"but the tower takes {native} x {native}")
        return prep.resized_to(self.image_size) if resized else prep

    def grid(self) -> tuple[int, int]:
        return self._side, self._side

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self._naflex:
            inputs = naflex_inputs(pixels, self.patch)
        else:
            inputs = {"pixel_values": pixels, **({"interpolate_pos_encoding": True} if self._interpolate else {})}
        out = self.tower(**inputs, output_hidden_states=True)
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


@contextmanager
def _quiet(dual: bool) -> Iterator[None]:
    """Without transformers' load report for a dual checkpoint: its text side is left out on purpose."""
    level = hf_logging.get_verbosity()
    if dual:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


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
        with hub_errors(source, "vision tower", SECTION):
            data, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except (OSError, ValueError):
        return None
    return data or None
