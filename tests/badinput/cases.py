"""The corpus: each case writes one broken input and says how the command must fail on it.

A case is a function ``Env -> Expect`` registered with :func:`case`, under a class (``data``,
``image``, ``config``, ``model``) and the command it runs through. Each breaks exactly one thing
in otherwise good inputs (see :mod:`tests.badinput.env`), so the error can only be about that
thing and must name it.
"""


from __future__ import annotations

import dataclasses

from . import config_cases, data_cases, image_cases, model_cases  # noqa: F401  (registering their cases)
from .registry import CASES, CLASSES, Case

__all__ = ["CASES", "CLASSES", "PENDING_ON_IMAGES_BRANCH", "Case", "images_branch_merged"]

# Cases whose behaviour is delivered by the image-decoding rework on branch ``images`` (pixel modes,
# decompression bombs, refusal of paths outside the image root, skips recorded at load time):
# skipped until that branch is merged, which the presence of its config field tells.
PENDING_ON_IMAGES_BRANCH: frozenset[str] = frozenset({
    "image_absolute_path", "image_outside_root_dotdot", "image_outside_root_allowed",  # the image root
    "image_decompression_bomb", "chat_image_decompression_bomb",  # a pixel limit, refused unread
    "image_16bit_grey_decodes",  # pixel modes decoded to their range, not clipped
    "eval_image_truncated",  # eval names the data file and sample of a broken image
    "data_skip_bad_record", "data_jsonl_broken_line_skipped",  # records skipped at load time recorded
})


def images_branch_merged() -> bool:
    from chiasm.config import StageConfig

    return "allow_outside_image_root" in {f.name for f in dataclasses.fields(StageConfig)}
