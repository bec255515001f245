"""Run under torchrun by tests/test_clip_dist.py: the contrastive losses and CLIP training on 2 gloo ranks.

argv: OUT_JSON RUN_DIR. Writes, from rank 0, each loss's global value and each rank's feature
gradients, after a short CLIP training run whose weights the test compares with one process.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from chiasm.clip.losses import clip_loss, siglip_loss
from chiasm.clip.train import ClipTrainer
from chiasm.train.dist import init_distributed

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from clip_cases import tiny_config


def main() -> None:
    out, run_dir = sys.argv[1], sys.argv[2]
    info = init_distributed("gloo")
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    txt = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    half = slice(info.rank * 4, info.rank * 4 + 4)
    result = {}
    for name in ("clip", "siglip"):
        i, t = img[half].clone().requires_grad_(), txt[half].clone().requires_grad_()
        loss = clip_loss(i, t, torch.tensor(5.0)) if name == "clip" else \
            siglip_loss(i, t, torch.tensor(5.0), torch.tensor(-2.0))
        loss.backward()
        parts = [torch.zeros(3, dtype=torch.float64) for _ in range(2)]
        dist.all_gather(parts, torch.tensor([float(loss), float(i.grad.abs().sum()), 0.0], dtype=torch.float64))
        grads_i = [torch.zeros(4, 6) for _ in range(2)]
        grads_t = [torch.zeros(4, 6) for _ in range(2)]
        dist.all_gather(grads_i, i.grad.contiguous())
        dist.all_gather(grads_t, t.grad.contiguous())
        result[name] = {"loss": sum(float(p[0]) for p in parts) / 2,
                        "grad_img": torch.cat(grads_i).tolist(), "grad_txt": torch.cat(grads_t).tolist()}
    ClipTrainer(tiny_config(run_dir)).run()
    if info.rank == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
