"""Contrastive losses: symmetric InfoNCE (CLIP) and pairwise sigmoid (SigLIP).

Each rank scores its own images and captions against the features of the whole global batch,
gathered *with* gradients, and reports its share (``loss_r``); the global loss is the mean of the
shares, and DDP's gradient averaging then gives exactly the single-process gradient of the
global batch (each feature's gradient arrives summed over the ranks that used it). With one
process the two losses are CLIP's and SigLIP's as written in their papers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``x`` stacked along dim 0 (gradients flow back to each owner), and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


def _check_batch(img: torch.Tensor, txt: torch.Tensor) -> None:
    if img.shape != txt.shape:
        raise ValueError(f"image features {tuple(img.shape)} and text features {tuple(txt.shape)} differ in shape")
    if img.shape[0] < 2 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("a contrastive loss needs at least 2 image-caption pairs in a batch; got 1 "
                         "(there is nothing to contrast the pair with)")


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy over the scaled cosine similarities.

    ``img`` and ``txt`` are L2-normalised ``(B, D)``; ``logit_scale`` is the scale itself
    (exp of the learnt log-temperature), as open_clip's ``ClipLoss`` takes it.
    """
    _check_batch(img, txt)
    all_img, offset = gather_with_grad(img)
    all_txt, _ = gather_with_grad(txt)
    labels = torch.arange(offset, offset + img.shape[0], device=img.device)
    per_image = logit_scale * img @ all_txt.T
    per_text = logit_scale * txt @ all_img.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's loss: every image-caption pair is a binary match / no-match decision.

    Summed over pairs and divided by the number of images, as the paper (and open_clip's
    ``SigLipLoss``) does.
    """
    _check_batch(img, txt)
    all_txt, offset = gather_with_grad(txt)
    logits = logit_scale * img @ all_txt.T + logit_bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(img.shape[0], device=img.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]
