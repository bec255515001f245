"""The corpus: each case writes one broken input and says how the command must fail on it.

A case is a function ``Env -> Expect`` registered with :func:`case`, under a class (``data``,
``image``, ``config``, ``model``) and the command it runs through. Each breaks exactly one thing
in otherwise good inputs (see :mod:`tests.badinput.env`), so the error can only be about that
thing and must name it.
"""


from __future__ import annotations

from . import config_cases, data_cases, image_cases, model_cases  # noqa: F401  (registering their cases)
from .registry import CASES, CLASSES, Case

__all__ = ["CASES", "CLASSES", "Case"]
