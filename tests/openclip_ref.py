"""open_clip's loss and model modules for the CLIP tests (see benchmarks/openclip_ref.py), or a skip."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks folder is a package of the repository
from benchmarks import openclip_ref


def load(module: str) -> types.ModuleType:
    try:
        return openclip_ref.load(module)
    except ImportError as exc:
        pytest.skip(str(exc))
