"""SigLIP2 NaFlex towers, run at one square patch grid.

A NaFlex tower takes an image as a flat list of patches plus the grid they came from; its own
processor picks that grid per image, keeping the aspect ratio within a patch budget
(``max_num_patches``). chiasm's bridges and its visual-token count need one grid for every
image, so such a tower runs here at one square grid: the largest square within the
processor's budget (256 patches: 16 x 16), or ``image_size`` / patch size when the encoder
config sets a size. For a square image that is exactly the grid and the pixels the tower's own
processor gives; other images are resized to the square, unless ``pad_to_square = true``
keeps their aspect ratio as the processor would (with padding instead of a non-square grid).
"""

from __future__ import annotations

import math
from typing import Any

import torch

NAFLEX_TYPES = frozenset({"siglip2_vision_model"})


def naflex_side(processor_config: dict[str, Any] | None, vision_config: Any) -> int:
    """Patches per side of the largest square grid within the tower's patch budget."""
    budget = (processor_config or {}).get("max_num_patches") or getattr(vision_config, "num_patches", 0)
    side = math.isqrt(int(budget))
    if side < 1:
        raise ValueError(f"{type(vision_config).__name__}: no patch budget (max_num_patches or num_patches) to "
                         "choose a grid from; set the encoder's image_size")
    return side


def check_patch_size(processor_config: dict[str, Any] | None, patch: int) -> None:
    """The processor cuts the patches the tower embeds: both must use one patch size."""
    theirs = (processor_config or {}).get("patch_size")
    if theirs is not None and int(theirs) != patch:
        raise ValueError(f"the tower's image processor cuts {theirs} px patches, its config embeds {patch} px patches")


def naflex_inputs(pixels: torch.Tensor, patch: int) -> dict[str, torch.Tensor]:
    """``(B, C, H, W)`` pixels -> the tower's inputs: patches flattened row-major, each as (row, column, channel).

    That order is the one the NaFlex processor writes and the tower's patch embedding reads.
    """
    b, c, h, w = pixels.shape
    rows, cols = h // patch, w // patch
    patches = (pixels.reshape(b, c, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1)
               .reshape(b, rows * cols, patch * patch * c))
    shapes = torch.tensor([[rows, cols]], dtype=torch.long, device=pixels.device).expand(b, 2)
    mask = torch.ones(b, rows * cols, dtype=torch.long, device=pixels.device)
    return {"pixel_values": patches, "spatial_shapes": shapes, "pixel_attention_mask": mask}
