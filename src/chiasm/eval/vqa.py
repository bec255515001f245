"""Visual question answering: accuracy under a named scorer, overall and per question type.

Also the image-reliance check: the same questions asked with a blank picture. A model
that scores as well without the image answers from text priors alone.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from chiasm.data.sample import Sample
from chiasm.eval.scorers import get_scorer, truth_of
from chiasm.features import FeatureCache
from chiasm.model import VisionLanguageModel

RELIANCE_MARGIN = 0.10  # with-image accuracy must beat blank-image accuracy by this much


@torch.no_grad()
def answer(model: VisionLanguageModel, samples: list[Sample], *, batch_size: int = 16, max_new_tokens: int = 8,
           features: FeatureCache | None = None, override_image: str | None = None,
           desc: str = "answering") -> list[str]:
    """Greedy answers to the last question of each sample (its gpt turn, if any, is dropped)."""
    model.eval()
    processor = model.processor
    prepared, _ = processor.prepare(samples, for_generation=True)
    out: list[str] = []
    for i in tqdm(range(0, len(prepared), batch_size), desc=desc, unit="batch", leave=False):
        items = prepared[i : i + batch_size]
        batch = processor.collate(items, left_pad=True, features=features,
                                  override_images=[override_image] if override_image else None).to(model.device)
        rows = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, features=batch.features,
                              max_new_tokens=max_new_tokens, audio=batch.audio)
        out.extend(model.tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows)
    return out


def score(samples: list[Sample], predictions: list[str], scorer: str = "exact") -> dict:
    """Mean score overall and per ``meta['question_type']`` under the scorer named ``scorer``
    (chiasm.eval.scorers); ``scores`` per sample, ``hits`` where the score is full credit."""
    judge = get_scorer(scorer)
    per: dict[str, list[float]] = defaultdict(list)
    scores = []
    for s, p in zip(samples, predictions, strict=True):
        value = judge.score(p, s)
        scores.append(value)
        per[str(s.meta.get("question_type", "all"))].append(value)
    return {"overall": sum(scores) / max(1, len(scores)), "n": len(scores),
            "per_type": {k: sum(v) / len(v) for k, v in sorted(per.items())},
            "hits": [v >= 1.0 for v in scores], "scores": scores}


def chance(samples: list[Sample]) -> dict:
    """Accuracy of the best constant answer per type: what a blind model could reach."""
    by_type: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        by_type[str(s.meta.get("question_type", "all"))][truth_of(s).strip().lower()] += 1
    per = {k: c.most_common(1)[0][1] / sum(c.values()) for k, c in sorted(by_type.items())}
    total = sum(sum(c.values()) for c in by_type.values())
    overall = sum(c.most_common(1)[0][1] for c in by_type.values()) / max(1, total)
    return {"overall": overall, "per_type": per}


def blank_image(folder: Path, size: int) -> Path:
    """A uniform mid-grey picture: the image-reliance control."""
    path = Path(folder) / f"blank-{size}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (size, size), (128, 128, 128)).save(path)
    return path


def reliance_verdict(with_image: float, blank: float, chance_acc: float) -> dict:
    gap = with_image - blank
    collapsed = gap < RELIANCE_MARGIN
    if collapsed:
        msg = (f"COLLAPSED: accuracy with the image ({with_image:.1%}) is within {RELIANCE_MARGIN:.0%} of "
               f"accuracy with a blank image ({blank:.1%}); the model answers from text alone.")
    else:
        msg = (f"uses the image: {with_image:.1%} with the image vs {blank:.1%} blank "
               f"(chance {chance_acc:.1%}).")
    return {"collapsed": collapsed, "gap": gap, "message": msg}
