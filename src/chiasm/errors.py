"""Which exceptions are a user's mistake, and the one line the ``chiasm`` command prints for them.

A missing file, a corrupt checkpoint or an out-of-range config value is not a bug: the person
running the command needs the file's name and what to do, not forty lines of stack. A bug in
chiasm (an AssertionError, a TypeError, a ValueError raised deep inside PyTorch) must keep
its traceback, so only the classes below count as a user's mistake, and a bare ValueError
only when chiasm itself raised it (chiasm raises them for bad input, with a message written
for the user); a bare KeyError is a lookup bug.
"""

from __future__ import annotations

import json
import tomllib
from types import TracebackType

from safetensors import SafetensorError

from chiasm.config import ConfigError
from chiasm.data.sample import DataError


class UnknownNameError(KeyError):
    """A name (encoder, bridge, packaged model) that no table knows; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError's own would print the message as a quoted repr
        return str(self.args[0]) if self.args else ""


class ModelFolderError(ValueError):
    """A saved folder (a model, a checkpoint, a pretrained part) that lacks a piece or holds a corrupt one."""


_ALWAYS = (ConfigError, DataError, ModelFolderError, UnknownNameError, json.JSONDecodeError,
           tomllib.TOMLDecodeError, SafetensorError)

_HINTS = {
    PermissionError: "check its permissions, or choose a path this user may read or write",
    IsADirectoryError: "give a file, not a folder",
    NotADirectoryError: "a part of the path is a file, not a folder",
}


def _raised_by_chiasm(tb: TracebackType | None) -> bool:
    """Whether the innermost frame of ``tb`` is chiasm's own code."""
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and str(last.tb_frame.f_globals.get("__name__", "")).split(".")[0] == "chiasm"


def user_message(exc: BaseException) -> str | None:
    """The message for a user's mistake (config errors keep one line per problem); None for a bug."""
    if isinstance(exc, _ALWAYS) or (isinstance(exc, ValueError) and _raised_by_chiasm(exc.__traceback__)):
        return str(exc) if isinstance(exc, ConfigError) else one_line(str(exc))
    if isinstance(exc, OSError):  # a missing file, no permission, a disk that is full...
        text = str(exc)
        if exc.filename is not None and exc.strerror:
            text = f"{exc.strerror}: {exc.filename}"
        hint = next((h for cls, h in _HINTS.items() if isinstance(exc, cls)), None)
        return one_line(f"{text}; {hint}" if hint else text)
    return None


def one_line(text: str) -> str:
    """``text`` with its lines joined, so that an error reads as one line whatever it wraps."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())
