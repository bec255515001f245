"""Token-reducing bridges: counts, shapes, the exact arithmetic, and clear errors."""

from __future__ import annotations

import pytest
import torch

from chiasm.bridges import build_bridge
from chiasm.config import BridgeConfig


@pytest.mark.parametrize(("name", "options"), [("pixel_shuffle", {"factor": 2}), ("pooling", {"kernel": 2})])
def test_four_times_fewer_tokens(name: str, options: dict) -> None:
    bridge = build_bridge(BridgeConfig(name, options), vision_dim=8, lm_dim=16)
    out = bridge(torch.randn(3, 16, 8), (4, 4))
    assert bridge.num_tokens((4, 4)) == 4 and out.shape == (3, 4, 16)


@pytest.mark.parametrize("name", ["pixel_shuffle", "pooling"])
def test_grid_not_divisible_is_a_clear_error(name: str) -> None:
    bridge = build_bridge(BridgeConfig(name, {}), vision_dim=8, lm_dim=16)
    with pytest.raises(ValueError, match=r"7x7 feature grid is not divisible by factor 2"):
        bridge.num_tokens((7, 7))


def test_pooling_with_a_rectangular_kernel_averages_consecutive_frames_of_one_row() -> None:
    """An audio encoder's (1, T) grid: kernel [1, 4] makes one token of each 4 consecutive frames."""
    bridge = build_bridge(BridgeConfig("pooling", {"kernel": [1, 4]}), vision_dim=3, lm_dim=5)
    frames = torch.randn(2, 12, 3)
    with torch.no_grad():
        expected = bridge.mlp(frames.view(2, 3, 4, 3).mean(2), (1, 3))
    assert bridge.num_tokens((1, 12)) == 3 and bridge.token_grid((1, 12)) == (1, 3)
    assert torch.allclose(bridge(frames, (1, 12)), expected, atol=1e-6)
    with pytest.raises(ValueError, match="1x10 feature grid is not divisible by the 1x4 kernel"):
        bridge.num_tokens((1, 10))
    with pytest.raises(ValueError, match="kernel is k or"):
        build_bridge(BridgeConfig("pooling", {"kernel": [1, 2, 3]}), vision_dim=3, lm_dim=5)


def test_pixel_shuffle_groups_each_2x2_block_into_one_token() -> None:
    bridge = build_bridge(BridgeConfig("pixel_shuffle", {"factor": 2}), vision_dim=1, lm_dim=4)
    with torch.no_grad():
        bridge.proj.weight.copy_(torch.eye(4))
        bridge.proj.bias.zero_()
    grid_values = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # a 4x4 grid numbered row by row
    out = bridge(grid_values, (4, 4))
    # Token 0 holds the top-left 2x2 block (cells 0, 1, 4, 5); token 3 the bottom-right one.
    assert out[0, 0].tolist() == [0, 1, 4, 5] and out[0, 3].tolist() == [10, 11, 14, 15]


def test_pooling_averages_each_block_before_the_mlp() -> None:
    bridge = build_bridge(BridgeConfig("pooling", {"kernel": 2}), vision_dim=2, lm_dim=4)
    feats = torch.randn(1, 16, 2)
    blocks = feats.view(1, 4, 4, 2)
    expected_in = torch.stack([blocks[0, :2, :2].mean((0, 1)), blocks[0, :2, 2:].mean((0, 1)),
                               blocks[0, 2:, :2].mean((0, 1)), blocks[0, 2:, 2:].mean((0, 1))])
    torch.testing.assert_close(bridge(feats, (4, 4))[0], bridge.mlp(expected_in[None], (2, 2))[0])


def test_pixel_shuffle_with_a_rectangular_factor_stacks_consecutive_frames() -> None:
    """[1, 3] on a (1, 6) grid: tokens of 3 consecutive frames side by side, as pixel_unshuffle orders a square."""
    bridge = build_bridge(BridgeConfig("pixel_shuffle", {"factor": [1, 3]}), vision_dim=2, lm_dim=6)
    with torch.no_grad():
        bridge.proj.weight.copy_(torch.eye(6))
        bridge.proj.bias.zero_()
    frames = torch.arange(12, dtype=torch.float32).view(1, 6, 2)  # frame f holds (2f, 2f + 1)
    out = bridge(frames, (1, 6))
    # channel-major: feature 0 of frames 0, 1, 2, then feature 1 of them
    assert out.shape == (1, 2, 6) and out[0, 0].tolist() == [0, 2, 4, 1, 3, 5]
    with pytest.raises(ValueError, match="1x7 feature grid is not divisible by the 1x3 factor"):
        bridge.num_tokens((1, 7))
