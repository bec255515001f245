"""Samples a stage left out under ``on_error = "skip"``: recorded, written, and capped.

Skipping keeps one broken image from killing a week-long run, but silent skipping hides a
data file that is mostly broken. Every skip of a stage (a bad record, a sample that does not
tokenise, a broken image) is kept here with its reason, written to
``RUN/stages/NAME/skipped.jsonl`` (shown in the HTML report), and counted against the stage's
``max_skip_fraction`` of the data file's records: past it the stage stops, naming the file,
the fraction and the first reasons.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from chiasm.data.sample import DataError, Sample
from chiasm.jsonl import read_records

log = logging.getLogger(__name__)
SKIPPED_FILE = "skipped.jsonl"


@dataclass(frozen=True)
class Skip:
    """One left-out sample: its id, the data file, the image at fault (if any) and why; for a sample
    the data loader left out while training, also where (optimizer step, micro-batch, rank), which a
    resumed run reads back to count the skips before its checkpoint."""

    id: str
    file: str
    image: str | None
    reason: str
    step: int | None = None
    micro: int | None = None
    rank: int | None = None


class SkipLog:
    """The skips of one stage, deduplicated by sample id (a sample is skipped once, however often seen).

    ``total`` is the number of records in the data file, the denominator of the fraction.
    ``out`` is the stage folder to write ``skipped.jsonl`` into (None: nothing is written, as
    on every rank but the first).
    """

    def __init__(self, stage: str, data: str, total: int, max_fraction: float, out: Path | None = None):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"stage {stage!r}: max_skip_fraction must be in [0, 1], got {max_fraction}")
        self.stage, self.data, self.total, self.max_fraction, self.out = stage, data, total, max_fraction, out
        self.skips: dict[str, Skip] = {}

    def __len__(self) -> int:
        return len(self.skips)

    @property
    def fraction(self) -> float:
        return len(self.skips) / self.total if self.total else 0.0

    def add(self, sample_id: str, reason: str, *, image: str | None = None, file: str | None = None,
            where: tuple[int, int, int] | None = None) -> bool:
        """Record a skip (``where``: step, micro-batch and rank of a training-time one); False if
        this sample was already skipped."""
        if sample_id in self.skips:
            return False
        self.skips[sample_id] = Skip(sample_id, file or self.data, image, reason, *(where or (None, None, None)))
        return True

    def add_error(self, error: DataError, fallback_id: str = "?") -> bool:
        sid = error.sample_id if error.sample_id is not None else fallback_id
        return self.add(sid, str(error), image=error.image)

    def restore(self) -> None:
        """Take back the skips an interrupted run of this stage wrote: a resumed stage does not
        see again the batches before its checkpoint, nor the broken images they held."""
        if self.out is not None:
            for record in read_skips(self.out / SKIPPED_FILE):
                if isinstance(record.get("id"), str) and isinstance(record.get("reason"), str):
                    where = tuple(record.get(k) for k in ("step", "micro", "rank"))
                    self.add(record["id"], record["reason"], image=record.get("image"), file=record.get("file"),
                             where=where if all(isinstance(v, int) for v in where) else None)

    def check(self) -> None:
        """Raise if more than ``max_fraction`` of the data file's records were skipped."""
        if self.skips and self.fraction > self.max_fraction:
            first = "; ".join(s.reason for s in list(self.skips.values())[:3])
            raise DataError(f"stage {self.stage!r}: {len(self.skips)} of {self.total} records skipped "
                            f"({self.fraction:.1%}), over max_skip_fraction {self.max_fraction:.1%}; "
                            f"first reasons: {first}", source=self.data)

    def write(self) -> Path | None:
        """Write every skip as one JSON line (replacing the file atomically); None where nothing is written."""
        if self.out is None:
            return None
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / SKIPPED_FILE
        tmp = path.with_name(path.name + ".tmp")
        # Where a skip was seen during training is written only for those skips.
        rows = [{k: v for k, v in asdict(s).items() if v is not None or k == "image"} for s in self.skips.values()]
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, path)
        return path

    def absorb(self, entries: Iterable[dict]) -> None:
        """Take in the skips the stage's data loader recorded while training (its ``sample``,
        ``image``, ``error`` and position keys); new ones are logged, written and checked against the cap."""
        new = [e for e in entries if self.add(str(e.get("sample")), str(e.get("error")), image=e.get("image"),
                                              file=e.get("source"), where=(e["step"], e["micro"], e["rank"]))]
        if not new:
            return
        log.warning("stage %s: %d more samples skipped while training (%d in all; first: %s)",
                    self.stage, len(new), len(self), new[0].get("error"))
        self.write()
        self.check()


def drop_bad_images(samples: list[Sample], bad: Mapping[str, str], skips: SkipLog,
                    on_error: str = "skip") -> list[Sample]:
    """The samples none of whose images is in ``bad`` (path -> reason); the others are recorded in ``skips``.

    With ``on_error="raise"`` the first such sample raises instead (a cache built under
    ``skip`` by an earlier run can list broken images that this run must not train around).
    """
    kept = []
    for s in samples:
        broken = next((str(p) for p in s.images if str(p) in bad), None)
        if broken is None:
            kept.append(s)
        elif on_error != "skip":
            raise DataError(bad[broken], source=s.source, sample_id=s.id, image=broken)
        else:
            error = DataError(bad[broken], source=s.source, sample_id=s.id, image=broken)
            skips.add(s.id, str(error), image=broken)
    return kept


def read_skips(path: Path) -> list[dict]:
    """The records of a ``skipped.jsonl`` file ([] if it is missing; unreadable lines are left out)."""
    return read_records(path)


def loader_skips_before(stage_dir: Path | None, start_step: int) -> list[dict]:
    """The skips the data loader recorded before ``start_step``, read back from the stage's skip
    file in the loader's own form: a resumed stage does not see those batches again."""
    if stage_dir is None or not start_step:
        return []
    return [{"step": r["step"], "micro": r["micro"], "rank": r["rank"], "sample": r["id"], "source": r["file"],
             "image": r.get("image"), "error": r["reason"]}
            for r in read_skips(stage_dir / SKIPPED_FILE)
            if isinstance(r.get("step"), int) and r["step"] < start_step and isinstance(r.get("micro"), int)]
