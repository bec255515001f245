"""Reading the JSON-lines files a run appends to (metrics, skipped samples), kills included.

A run killed mid-write leaves a cut-off last line; it must not hide every record written
before it, nor stop a resume. One reader serves the trainer, the skip log and the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per line; a missing file gives [].

    Blank lines and lines that are not JSON objects are left out; a line that is not whole
    JSON (cut off by a kill) is left out with a warning naming the file.
    """
    path = Path(path)
    if not path.is_file():
        return []
    records: list[dict[str, Any]] = []
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: skipped a line that is not whole JSON (cut off by a kill?): %.80s", path, line)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records
