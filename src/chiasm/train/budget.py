"""A stage's per-sample image-token budget, applied once to the loaded samples before step 1.

Counts come from image sizes alone (:meth:`chiasm.conversation.ConversationEncoder.image_counts`:
tiles and frames, the same function data, model and generation use), so no pixel is decoded.
A sample over the budget is refused, as an error naming it or, under ``on_error = "skip"``, a
counted skip; with ``budget_drop = "frames"`` a video sample first loses evenly spaced frames
(:func:`chiasm.data.video.fit_budget`), and what each sample lost is logged and written to
``budget_dropped.jsonl`` in the stage folder, so nothing is dropped unsaid.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from chiasm.config import StageConfig
from chiasm.conversation import ConversationEncoder
from chiasm.data.sample import DataError, Sample
from chiasm.data.video import fit_budget
from chiasm.train.skips import SkipLog

log = logging.getLogger(__name__)
DROPPED_FILE = "budget_dropped.jsonl"


def apply_token_budget(samples: list[Sample], stage: StageConfig, encoder: ConversationEncoder, skips: SkipLog,
                       out: Path | None) -> list[Sample]:
    """``samples`` within ``stage.image_token_budget`` image tokens each (all of them when it is None)."""
    budget = stage.image_token_budget
    if budget is None:
        return samples
    kept: list[Sample] = []
    dropped: list[dict] = []
    for s in samples:
        try:
            fitted, lost = fit_budget(s, encoder.image_counts(s), budget, drop=stage.budget_drop)
        except DataError as err:
            if stage.on_error != "skip":
                raise
            skips.add_error(err, s.id)
            continue
        if lost:
            dropped.append({"id": s.id, "dropped": lost})
        kept.append(fitted)
    if dropped:
        n_frames = sum(len(d["dropped"]) for d in dropped)
        log.info("stage %s: %d sample(s) lost %d frame(s) to fit %d image tokens (first: %s: %s)", stage.name,
                 len(dropped), n_frames, budget, dropped[0]["id"], ", ".join(dropped[0]["dropped"]))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / DROPPED_FILE).write_text("".join(json.dumps(d) + "\n" for d in dropped))
    if len(kept) < len(samples):
        log.warning("stage %s: %d sample(s) over the budget of %d image tokens skipped", stage.name,
                    len(samples) - len(kept), budget)
    return kept
