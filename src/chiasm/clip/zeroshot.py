"""Zero-shot classification and image-text retrieval.

Zero-shot follows the CLIP paper: each class name is put into every prompt template, the
text embeddings are averaged over templates and renormalised (one classifier row per class),
and an image's class is the row its embedding is most similar to.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from chiasm.clip.labelled import check_classes, check_templates
from chiasm.clip.model import ClipModel
from chiasm.clip.pairs import PairSet


@torch.no_grad()
def image_embeddings(model: ClipModel, pairs: PairSet, batch_size: int = 512, desc: str = "embedding images"
                     ) -> torch.Tensor:
    pre, device = model.preprocessing, model.logit_scale.device
    out = []
    for lo in tqdm(range(0, len(pairs), batch_size), desc=desc, unit="batch", leave=False):
        idx = range(lo, min(lo + batch_size, len(pairs)))
        out.append(model.encode_image(torch.stack([pre(pairs.image(i)) for i in idx]).to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def classifier(model: ClipModel, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """``(C, D)``: per class, the renormalised mean of its template embeddings."""
    check_classes(list(classes), "classes")
    check_templates(list(templates), "templates")
    rows = []
    for name in classes:
        emb = model.encode_captions([t.format(name) for t in templates]).float().cpu()
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
    return torch.stack(rows)


def zero_shot(model: ClipModel, pairs: PairSet, templates: Sequence[str], *, batch_size: int = 512,
              image_emb: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> dict:
    """Top-1 / top-5 accuracy, per-class recall and the confusion matrix on a labelled set."""
    if pairs.classes is None or pairs.labels is None:
        raise ValueError(f"{pairs.name}: zero-shot classification needs class names and labels")
    emb = image_embeddings(model, pairs, batch_size) if image_emb is None else image_emb
    weights = classifier(model, pairs.classes, templates) if weights is None else weights
    scores = emb @ weights.T
    labels = torch.tensor(pairs.labels)
    k = min(5, len(pairs.classes))
    top = scores.topk(k, dim=1).indices
    pred = top[:, 0]
    n_cls = len(pairs.classes)
    confusion = np.zeros((n_cls, n_cls), dtype=int)
    np.add.at(confusion, (labels.numpy(), pred.numpy()), 1)
    support = confusion.sum(1)
    recall = {c: (float(confusion[i, i] / support[i]) if support[i] else None) for i, c in enumerate(pairs.classes)}
    return {"n": len(pairs), "top1": float((pred == labels).float().mean()),
            f"top{k}": float((top == labels[:, None]).any(1).float().mean()),
            "per_class_recall": recall, "confusion": confusion.tolist(), "classes": list(pairs.classes),
            "templates": list(templates)}


@torch.no_grad()
def retrieval(model: ClipModel, pairs: PairSet, *, batch_size: int = 512, ks: Sequence[int] = (1, 5, 10),
              image_emb: torch.Tensor | None = None) -> dict:
    """Image->text and text->image recall@k; every caption of a sample counts as its match."""
    img = image_embeddings(model, pairs, batch_size) if image_emb is None else image_emb
    texts, owner = [], []
    for i in range(len(pairs)):
        for c in pairs.captions(i):
            texts.append(c)
            owner.append(i)
    txt = model.encode_captions(texts).float().cpu()
    owner_t = torch.tensor(owner)
    sims = img @ txt.T  # (N images, M captions)
    out: dict = {"n_images": len(pairs), "n_captions": len(texts)}
    # image -> text: rank of the best-ranked caption of that image
    order = sims.argsort(dim=1, descending=True)
    hit_rank_i = (owner_t[order] == torch.arange(len(pairs))[:, None]).float().argmax(1)
    # text -> image
    rank_t = (sims.T > sims.T.gather(1, owner_t[:, None])).sum(1)
    for k in ks:
        out[f"i2t_R@{k}"] = float((hit_rank_i < k).float().mean())
        out[f"t2i_R@{k}"] = float((rank_t < k).float().mean())
    return out
