"""Gated cross-attention projects each image's memory once and matches the per-token reference."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chiasm.bridges.gated_xattn import GatedCrossAttentionBridge, GatedXAttnDense
from chiasm.bridges.layer_inputs import IMAGE_MEMORY, IMAGE_OF_TOKEN
from chiasm.testing import per_token_cross_attention

DIM, HEADS, LATENTS, VISION = 64, 4, 6, 16
GRID = (3, 3)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _batch(length: int = 10) -> tuple[GatedCrossAttentionBridge, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row 0: text, image, text, image, text; row 1: text only; row 2: three images."""
    torch.manual_seed(0)
    bridge = GatedCrossAttentionBridge(VISION, DIM, every=1, num_latents=LATENTS, heads=HEADS)
    is_image = torch.zeros(3, length, dtype=torch.bool)
    is_image[0, [2, 6]] = True
    is_image[2, [0, 3, 4]] = True
    features = torch.randn(5, GRID[0] * GRID[1], VISION, requires_grad=True)
    h = torch.randn(3, length, DIM, requires_grad=True)
    return bridge, is_image, features, h


def _global_image_of_token(is_image: torch.Tensor) -> torch.Tensor:
    """Each token's latest image as an index into the batch's list of images, -1 before any."""
    counts = is_image.long().cumsum(1)
    first = is_image.long().sum(1).cumsum(0) - is_image.long().sum(1)
    return torch.where(counts > 0, counts - 1 + first[:, None], -1)


def test_layer_inputs_group_images_by_row() -> None:
    bridge, is_image, features, _ = _batch()
    inputs = bridge.layer_inputs(features, GRID, is_image)
    memory = bridge.resampler(features, GRID)
    by_row, own = inputs[IMAGE_MEMORY], inputs[IMAGE_OF_TOKEN]
    assert by_row.shape == (3, 3, LATENTS, DIM)
    assert torch.equal(by_row[0, :2], memory[:2]) and torch.equal(by_row[2], memory[2:])
    assert torch.all(by_row[0, 2] == 0) and torch.all(by_row[1] == 0)
    assert own.tolist() == [[-1, -1, 0, 0, 0, 0, 1, 1, 1, 1], [-1] * 10, [0, 0, 0, 1, 2, 2, 2, 2, 2, 2]]


def test_attention_and_gradients_equal_the_per_token_reference() -> None:
    bridge, is_image, features, h = _batch()
    block = GatedXAttnDense(DIM, HEADS)
    with torch.no_grad():
        block.gate_attn.fill_(0.7)
        block.gate_ff.fill_(-0.4)
    inputs = bridge.layer_inputs(features, GRID, is_image)
    ours = block(h, inputs[IMAGE_MEMORY], inputs[IMAGE_OF_TOKEN])
    memory = bridge.resampler(features, GRID)
    attn = per_token_cross_attention(block, h, memory, _global_image_of_token(is_image))
    reference = h + torch.tanh(block.gate_attn) * attn
    reference = reference + torch.tanh(block.gate_ff) * block.ff(block.ln_ff(reference))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert torch.all(ours[1] == h[1] + torch.tanh(block.gate_ff) * block.ff(block.ln_ff(h[1])))  # no image: no attn

    weight = torch.randn_like(ours)
    params = [h, features, *block.parameters(), *bridge.resampler.parameters()]
    grads = torch.autograd.grad((ours * weight).sum(), params)
    ref_grads = torch.autograd.grad((reference * weight).sum(), params)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_no_tensor_of_tokens_times_latents_times_width_is_built() -> None:
    bridge, is_image, features, h = _batch(length=40)  # long enough that weights are not the largest tensors
    block = GatedXAttnDense(DIM, HEADS)
    with torch.no_grad():
        inputs = bridge.layer_inputs(features, GRID, is_image)
        memory = bridge.resampler(features, GRID)
        per_token = 3 * 40 * LATENTS * DIM
        with LargestTensor() as ours:
            block._attend(h, inputs[IMAGE_MEMORY], inputs[IMAGE_OF_TOKEN])
        with LargestTensor() as reference:
            per_token_cross_attention(block, h, memory, _global_image_of_token(is_image))
    assert reference.largest >= 2 * per_token  # the reference's keys and values, one copy per token
    assert ours.largest < per_token / 4
