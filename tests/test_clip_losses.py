"""CLIP and SigLIP losses against open_clip's ClipLoss / SigLipLoss, and their bad-input errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from openclip_ref import load

from chiasm.clip.losses import clip_loss, siglip_loss


def _features(b: int = 12, d: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g), dim=-1),
            F.normalize(torch.randn(b, d, generator=g), dim=-1))


@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
def test_clip_loss_equals_open_clip(scale: float) -> None:
    ref = load("loss").ClipLoss()
    img, txt = _features()
    s = torch.tensor(scale)
    assert torch.allclose(clip_loss(img, txt, s), ref(img, txt, s), atol=1e-6)


def test_clip_gradients_equal_open_clip() -> None:
    ref = load("loss").ClipLoss()
    grads = []
    for fn in (clip_loss, ref):
        img, txt = (x.clone().requires_grad_() for x in _features(seed=3))
        s = torch.tensor(14.0, requires_grad=True)
        fn(img, txt, s).backward()
        grads.append((img.grad, txt.grad, s.grad))
    for mine, theirs in zip(*grads, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-6)


@pytest.mark.parametrize(("scale", "bias"), [(10.0, -10.0), (3.0, 0.5)])
def test_siglip_loss_equals_open_clip(scale: float, bias: float) -> None:
    ref = load("loss").SigLipLoss()
    img, txt = (x.clone().requires_grad_() for x in _features(b=9, seed=1))
    s, b = torch.tensor(scale, requires_grad=True), torch.tensor(bias, requires_grad=True)
    mine = siglip_loss(img, txt, s, b)
    theirs = ref(img.detach().requires_grad_(), txt.detach().requires_grad_(), s.detach(), b.detach())
    assert torch.allclose(mine, theirs, atol=1e-5)
    mine.backward()
    assert b.grad is not None and s.grad is not None and img.grad.abs().sum() > 0


def test_clip_loss_of_perfect_pairs_is_small_and_of_identical_ones_is_log_b() -> None:
    img, _ = _features(b=8)
    assert float(clip_loss(img, img, torch.tensor(100.0))) < 0.05
    same = F.normalize(torch.ones(8, 4), dim=-1)
    assert math.isclose(float(clip_loss(same, same, torch.tensor(10.0))), math.log(8), rel_tol=1e-5)


def test_batch_of_one_is_refused() -> None:
    img, txt = _features(b=1)
    with pytest.raises(ValueError, match="at least 2 image-caption pairs"):
        clip_loss(img, txt, torch.tensor(10.0))
    with pytest.raises(ValueError, match="at least 2"):
        siglip_loss(img, txt, torch.tensor(10.0), torch.tensor(-10.0))


def test_mismatched_shapes_are_refused() -> None:
    img, txt = _features(b=4)
    with pytest.raises(ValueError, match="differ in shape"):
        clip_loss(img, txt[:3], torch.tensor(10.0))
