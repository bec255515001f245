"""A trained chiasm CLIP image tower as an encoder of the VLM seam (``name = "chiasm-clip"``, ``source = DIR``).

This is the LLaVA recipe's "eyes": a contrastively trained image tower, read by path. Its
features are the tower's token grid before pooling (the ViT's patch tokens after ``ln_post``,
without the class token; or the pretrained trunk's grid), and it brings its own preprocessing
from the CLIP folder. The projection into the CLIP space is dropped: the VLM's bridge maps
the tokens instead.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file

from chiasm.clip.model import CONFIG_FILE, IMAGE_ENCODER_FOLDER, read_config
from chiasm.clip.towers import EncoderImageTower, ViTImageTower
from chiasm.config import EncoderConfig
from chiasm.encoders.base import ENCODERS, VisionEncoder
from chiasm.errors import ModelFolderError


@ENCODERS.register("chiasm-clip")
class ChiasmClipEncoder(VisionEncoder):
    # grid: average-pool the tower's token grid to this (an int for a square, or [h, w]): fewer visual
    # tokens without changing what the tower sees, as the EfficientNet encoder's option of the same name.
    OPTIONS: ClassVar[dict[str, Any]] = {"pretrained": bool, "grid": int | list[int]}

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if not cfg.source:
            raise ValueError("encoder chiasm-clip needs source = a chiasm CLIP model folder (e.g. RUN/model)")
        folder = Path(cfg.source)
        clip_cfg, preprocessing = read_config(folder)
        image = clip_cfg.image
        if image.kind == "encoder" and (folder / IMAGE_ENCODER_FOLDER).is_dir():
            image = replace(image, encoder=replace(image.encoder, source=str(folder / IMAGE_ENCODER_FOLDER)))
        if image.kind == "vit":
            self.tower: ViTImageTower | EncoderImageTower = ViTImageTower(image, clip_cfg.embed_dim)
            self.grid_kind = "patch grid"
        else:
            self.tower = EncoderImageTower(image, clip_cfg.embed_dim, pretrained=False)
            self.grid_kind = self.tower.encoder.grid_kind
        if cfg.options.get("pretrained", True):
            path = folder / "model.safetensors"
            try:
                state = load_file(str(path))
            except (OSError, ValueError) as exc:
                raise ModelFolderError(f"{path}: cannot read the CLIP weights ({exc})") from exc
            self.tower.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
        self.tower.proj = None  # the bridge maps the tokens; the CLIP projection is not part of the encoder
        if cfg.image_size not in (None, self.tower.image_size):
            raise ValueError(f"chiasm-clip tower {folder} was trained at {self.tower.image_size} px; "
                             f"encoder image_size {cfg.image_size} would change its positional grid")
        self.image_size = self.tower.image_size
        self.dim = self.tower.width
        native = self.tower.grid()
        grid = cfg.options.get("grid", list(native))
        self._grid = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        if not (1 <= self._grid[0] <= native[0] and 1 <= self._grid[1] <= native[1]):
            raise ValueError(f"chiasm-clip grid {grid!r} must be between 1 and the tower's own grid {native}")
        self._preprocessing = preprocessing
        self._clip_config = json.loads((folder / CONFIG_FILE).read_text())
        self._source = folder

    def grid(self) -> tuple[int, int]:
        return self._grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        tokens = self.tower.tokens(pixels)
        tokens = tokens[:, 1:] if isinstance(self.tower, ViTImageTower) else tokens
        native = self.tower.grid()
        if self._grid == native:
            return tokens
        b, _, d = tokens.shape
        fmap = tokens.transpose(1, 2).reshape(b, d, *native)
        return torch.nn.functional.adaptive_avg_pool2d(fmap, self._grid).flatten(2).transpose(1, 2)

    def blocks(self) -> list[torch.nn.Module]:
        if isinstance(self.tower, ViTImageTower):
            return list(self.tower.transformer.resblocks)
        return self.tower.encoder.blocks()

    def enable_checkpointing(self) -> bool:
        if isinstance(self.tower, ViTImageTower):
            self.tower.set_checkpointing(True)
            return True
        return self.tower.encoder.enable_checkpointing()

    def export(self, folder: Path) -> None:
        """The CLIP config (and a pretrained trunk's own configs): enough to rebuild the tower offline."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(json.dumps(self._clip_config, indent=2) + "\n")
        if (self._source / IMAGE_ENCODER_FOLDER).is_dir():
            shutil.copytree(self._source / IMAGE_ENCODER_FOLDER, folder / IMAGE_ENCODER_FOLDER, dirs_exist_ok=True)
