"""The registry of bad-input cases, and the helpers the case modules share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .env import Env, Expect, good_records

CLASSES = ("data", "image", "config", "model")


@dataclass(frozen=True)
class Case:
    name: str
    cls: str
    command: str
    make: Callable[[Env], Expect]


CASES: dict[str, Case] = {}


def case(cls: str, command: str) -> Callable[[Callable[[Env], Expect]], Callable[[Env], Expect]]:
    assert cls in CLASSES, cls

    def register(fn: Callable[[Env], Expect]) -> Callable[[Env], Expect]:
        name = fn.__name__
        assert name not in CASES, f"case {name} registered twice"
        CASES[name] = Case(name, cls, command, fn)
        return fn

    return register


BAD = "bad-7"  # the id of the broken sample among good ones


def _with_bad(env: Env, bad: dict, name: str = "data.json") -> Path:
    records = good_records()
    return env.write_json([records[0], bad, *records[1:]], name)


def _train_err(env: Env, data: Path, *named: str, sample: str | None = BAD, before_model: bool = True,
               **kw) -> Expect:
    """A training run refused for ``data``; ``before_model``: found by reading the file, before any model."""
    absent = (*env.train_leftovers(), *((env.run_dir,) if before_model else ()))
    return Expect(env.train(data, **kw), named=(str(data), *named), sample=sample, absent=absent,
                  before_model=before_model)


def _eval_err(env: Env, data: Path, *named: str, sample: str | None = BAD, before_model: bool = True) -> Expect:
    return Expect(env.eval(data), named=(str(data), *named), sample=sample, absent=env.eval_leftovers(),
                  before_model=before_model)
