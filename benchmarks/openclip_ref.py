"""open_clip's own loss and model modules: the reference the CLIP tests and benchmarks compare against.

open_clip's package ``__init__`` imports its image transforms, which need torchvision; the
only torchvision wheels on PyPI are CUDA builds that do not load beside the CPU build of
torch that chiasm pins. The reference needs none of that: this loads ``open_clip.loss`` and
``open_clip.model`` from the installed package without running its ``__init__``, giving
``utils.py`` the one torchvision name it imports (``FrozenBatchNorm2d``, used only by ResNet
towers, never by the ViT and text towers compared here).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    """While open_clip's modules import: a ``torchvision.ops.misc`` with the one name they take.

    Removed again afterwards, so that nothing else (transformers asks whether torchvision is
    installed) ever sees it. A torchvision that imports is used as it is.
    """
    try:
        import torchvision.ops.misc  # noqa: F401
        working = True
    except Exception:  # missing, or a CUDA build that fails to load beside the CPU build of torch
        working = False
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    if working:
        yield
        return

    class FrozenBatchNorm2d(nn.Module):  # only named by open_clip.utils.freeze_batch_norm_2d
        pass

    names = ("torchvision", "torchvision.ops", "torchvision.ops.misc")
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = FrozenBatchNorm2d
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def load(module: str) -> types.ModuleType:
    """``open_clip.<module>`` (``loss`` or ``model``); ImportError when open_clip is not installed."""
    if "open_clip" not in sys.modules:
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("open_clip_torch is not installed (scripts/setup.sh --dev installs it)")
        import transformers  # noqa: F401  (imported before the stand-in exists; open_clip imports it)

        package = types.ModuleType("open_clip")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["open_clip"] = package
    with _torchvision_stand_in():
        return importlib.import_module(f"open_clip.{module}")
