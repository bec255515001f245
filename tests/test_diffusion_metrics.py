"""FID, precision/recall and the synthetic world's pixel checker against known answers."""

from __future__ import annotations

import pytest
import torch

from chiasm.diffusion.checker import check, read_image
from chiasm.diffusion.data import load_synthetic
from chiasm.diffusion.metrics import frechet_distance, precision_recall, recognition_rate

pytest.importorskip("scipy")


def test_frechet_distance_of_gaussians_matches_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * 2 + 1  # mean 1, std 2 per dimension
    # ||mu||^2 + sum(1 + 4 - 2 * sqrt(1 * 4)) = 3 + 3 * 1 = 6
    assert frechet_distance(a, b) == pytest.approx(6.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_see_mode_collapse() -> None:
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(400, 2, generator=gen)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    collapsed = real[real[:, 0] > 1.0][:40]  # faithful samples of one corner only
    precision, recall = precision_recall(real[:200], collapsed)
    assert precision > 0.9 and recall < 0.4
    assert recognition_rate(torch.tensor([1, 2, 3, 3]), torch.tensor([1, 2, 3, 0])) == 0.75


def test_checker_reads_the_worlds_own_renders_exactly() -> None:
    data = load_synthetic("test", 120, 32)
    assert check(data.images, data.scenes) == {"colour": 1.0, "cell": 1.0, "colour_and_cell": 1.0, "shape": 1.0}
    blank = torch.ones(3, 32, 32)
    assert read_image(blank).colour is None
    moved = torch.roll(data.images[0], shifts=(16, 16), dims=(1, 2))  # to the opposite quadrant
    assert read_image(moved).cell != data.scenes[0]["cell"]
