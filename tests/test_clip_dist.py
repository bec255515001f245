"""Two gloo processes: the contrastive losses and CLIP training equal one process on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from clip_cases import tiny_config
from safetensors.torch import load_file

from chiasm.clip.losses import clip_loss, siglip_loss
from chiasm.clip.train import ClipTrainer
from chiasm.testing import run_ranks


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    tmp = tmp_path_factory.mktemp("clipdist")
    run_ranks([str(Path(__file__).parent / "clip_dist_worker.py"), str(tmp / "out.json"), str(tmp / "run")])
    return json.loads((tmp / "out.json").read_text()), tmp / "run"


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_two_rank_loss_and_gradients_equal_one_process(two_ranks, name: str) -> None:
    """Each rank's share averages to the global loss; its feature gradients are world x the global ones
    (DDP's averaging over the 2 ranks then gives exactly the one-process parameter gradient)."""
    result = two_ranks[0][name]
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(8, 6, generator=g), dim=-1).requires_grad_()
    loss = clip_loss(img, txt, torch.tensor(5.0)) if name == "clip" else \
        siglip_loss(img, txt, torch.tensor(5.0), torch.tensor(-2.0))
    loss.backward()
    assert result["loss"] == pytest.approx(float(loss.detach()), rel=1e-5)
    assert torch.allclose(torch.tensor(result["grad_img"]) / 2, img.grad, atol=1e-6)
    assert torch.allclose(torch.tensor(result["grad_txt"]) / 2, txt.grad, atol=1e-6)


def test_two_rank_training_equals_one_process(two_ranks, tmp_path: Path) -> None:
    _, run2 = two_ranks
    ClipTrainer(tiny_config(str(tmp_path / "one"))).run()
    read = lambda run: [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(run2) == pytest.approx(read(tmp_path / "one"), rel=1e-4)
    w2 = load_file(str(run2 / "model" / "model.safetensors"))
    w1 = load_file(str(tmp_path / "one/model/model.safetensors"))
    assert w2.keys() == w1.keys()
    for k in w1:
        a, b = w1[k], w2[k]
        if k.endswith("attn.in_proj_bias"):  # the key bias cancels in softmax: its gradient is rounding noise,
            width = a.shape[0] // 3  # which Adam scales up to full-size steps; compare the query and value parts
            a, b = torch.cat([a[:width], a[2 * width:]]), torch.cat([b[:width], b[2 * width:]])
        assert torch.allclose(a, b, atol=1e-5), k
