"""Fixed-count bridges (C-Abstractor, Qwen-VL resampler, Perceiver) and 2D positions."""

from __future__ import annotations

import pytest
import torch

from chiasm.bridges import build_bridge
from chiasm.bridges.positions import fractional_sincos_2d, sincos_2d
from chiasm.config import BridgeConfig

NAMES = ["c_abstractor", "resampler", "perceiver"]


@pytest.mark.parametrize("name", NAMES)
def test_m_tokens_whatever_the_resolution(name: str) -> None:
    bridge = build_bridge(BridgeConfig(name, {"num_queries": 9}), vision_dim=12, lm_dim=32)
    for grid in [(4, 4), (7, 7), (3, 5)]:
        out = bridge(torch.randn(2, grid[0] * grid[1], 12), grid)
        assert bridge.num_tokens(grid) == 9 and out.shape == (2, 9, 32)


@pytest.mark.parametrize("name", ["c_abstractor", "resampler"])
def test_query_count_must_form_a_grid(name: str) -> None:
    with pytest.raises(ValueError, match="perfect square"):
        build_bridge(BridgeConfig(name, {"num_queries": 10}), vision_dim=12, lm_dim=32)


@pytest.mark.parametrize("name", NAMES)
def test_outputs_depend_on_the_features(name: str) -> None:
    torch.manual_seed(0)
    bridge = build_bridge(BridgeConfig(name, {"num_queries": 4}), vision_dim=12, lm_dim=32)
    a, b = torch.randn(1, 16, 12), torch.randn(1, 16, 12)
    assert not torch.allclose(bridge(a, (4, 4)), bridge(b, (4, 4)))


def test_resampler_keys_carry_2d_positions() -> None:
    """Swapping two feature cells changes the output: keys know where each cell is."""
    torch.manual_seed(0)
    bridge = build_bridge(BridgeConfig("resampler", {"num_queries": 4, "heads": 4}), vision_dim=12, lm_dim=32)
    x = torch.randn(1, 16, 12)
    swapped = x.clone()
    swapped[0, [0, 15]] = x[0, [15, 0]]
    assert not torch.allclose(bridge(x, (4, 4)), bridge(swapped, (4, 4)), atol=1e-5)


def test_sincos_2d_rows_and_columns() -> None:
    pos = sincos_2d((3, 4), 16).view(3, 4, 16)
    assert pos.abs().max() <= 1
    assert torch.equal(pos[0, 0, :8], pos[0, 3, :8])  # the row half ignores the column
    assert torch.equal(pos[0, 2, 8:], pos[2, 2, 8:])  # the column half ignores the row
    assert len({tuple(v.tolist()) for v in pos.view(12, 16)}) == 12  # every cell distinct
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d((2, 2), 6)


def test_fractional_code_depends_on_place_not_grid_size() -> None:
    small = fractional_sincos_2d((1, 1), 8)
    large = fractional_sincos_2d((3, 3), 8).view(3, 3, 8)
    torch.testing.assert_close(large[1, 1], small[0])  # both are the image centre
    code = fractional_sincos_2d((2, 2), 8).view(2, 2, 8)
    # the lowest octave's sine is monotone: top rows < bottom rows, left columns < right ones
    assert code[0, 0, 0] < code[1, 0, 0] and code[0, 0, 4] < code[0, 1, 4]
    # pinned values for the demo's 4 x 4 grid, so the MLP's pos_dim features never drift
    demo = fractional_sincos_2d((4, 4), 32)
    rows = (torch.arange(4.0) + 0.5) / 4
    freqs = torch.pi * 2.0 ** torch.arange(8.0) / 2
    torch.testing.assert_close(demo.view(4, 4, 32)[:, 0, :8], (rows[:, None] * freqs).sin(), rtol=0, atol=0)


def test_qformer_cross_attends_every_other_layer() -> None:
    bridge = build_bridge(BridgeConfig("qformer", {"num_queries": 8, "depth": 4, "hidden": 32, "heads": 4}),
                          vision_dim=12, lm_dim=24)
    assert [layer.cross is not None for layer in bridge.layers] == [True, False, True, False]
    for grid in [(4, 4), (2, 3)]:
        assert bridge(torch.randn(2, grid[0] * grid[1], 12), grid).shape == (2, 8, 24)
    with pytest.raises(ValueError, match="not divisible by heads"):
        build_bridge(BridgeConfig("qformer", {"hidden": 30, "heads": 4}), vision_dim=12, lm_dim=24)
