"""The world a bad-input case writes into: a good image, a good model, and helpers for the files around them.

Every case starts from inputs that work and breaks exactly one thing, so a failure can only come
from that one thing, and the message must name it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GOOD_QUESTION = "<image>\nWhat colour is the square?"


def record(sample_id: Any, image: Any = "img.png", question: str = GOOD_QUESTION, answer: str = "red",
           **extra: Any) -> dict:
    """One LLaVA record (one image, one question, one answer) with ``extra`` keys added as given."""
    rec: dict[str, Any] = {"id": sample_id}
    if image is not None:
        rec["image"] = image
    rec["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {**rec, **extra}


def good_records(n: int = 3) -> list[dict]:
    return [record(f"ok-{i}", answer="red", question_type="colour") for i in range(n)]


@dataclass
class Expect:
    """How one case must end.

    ``named``: strings the error line must hold (the offending file, the option...);
    ``sample``: the offending sample's id, named as ``sample 'ID'`` in the error (or listed as
    skipped); ``skipped``: a training case under ``on_error = "skip"``, which must exit 0 and
    record the sample as skipped in the run folder; ``absent``: paths a failed run must not leave.
    ``ok``: a case whose input is unusual but valid: it must succeed (exit 0).
    ``before_model``: found without building or loading a model (a config, a data file, a question).
    """

    argv: list[str]
    named: tuple[str, ...] = ()
    sample: str | None = None
    skipped: bool = False
    ok: bool = False
    absent: tuple[Path, ...] = ()
    before_model: bool = False  # the error must come before any model is built or loaded
    verify: Callable[[], None] | None = None  # a further check of what a successful case read


@dataclass
class Env:
    """One case's folder plus the shared good parts (a tiny LM, a saved tiny model, an image)."""

    root: Path
    lm_dir: Path
    saved_model: Path
    image: Path
    _model_copy: Path | None = field(default=None, repr=False)

    # ---- files ------------------------------------------------------------------------------
    def data_dir(self) -> Path:
        """A folder holding the good image as ``img.png``: the image root of the case's data."""
        folder = self.root / "data"
        if not (folder / "img.png").exists():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.image, folder / "img.png")
        return folder

    def write_json(self, records: Any, name: str = "data.json") -> Path:
        path = self.data_dir() / name
        path.write_text(json.dumps(records))
        return path

    def write_jsonl(self, lines: list[str], name: str = "data.jsonl") -> Path:
        path = self.data_dir() / name
        path.write_text("".join(line + "\n" for line in lines))
        return path

    def write_bytes(self, data: bytes, name: str) -> Path:
        path = self.data_dir() / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def model_copy(self) -> Path:
        """A copy of the saved model that the case may break."""
        if self._model_copy is None:
            self._model_copy = Path(shutil.copytree(self.saved_model, self.root / "model"))
        return self._model_copy

    # ---- commands ---------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    def train_config(self, data: Path | str, *, stage: str = "", model: str = "", top: str = "",
                     image_root: Path | None = None, lm: str | None = None) -> Path:
        """A one-stage, one-step run config over ``data``; the strings are appended to their tables."""
        root = f'image_root = "{image_root}"\n' if image_root is not None else ""
        text = (f'output_dir = "{self.run_dir}"\n{top}'
                f'[model]\n{model}'
                f'[model.encoder]\nname = "tiny-vit"\nimage_size = 64\noptions = {{ patch = 16, dim = 32 }}\n'
                f'[model.lm]\nsource = "{lm if lm is not None else self.lm_dir}"\n'
                f'[[stages]]\nname = "align"\ndata = "{data}"\n{root}max_steps = 1\nbatch_size = 2\n{stage}')
        path = self.root / "run.toml"
        path.write_text(text)
        return path

    def train(self, data: Path | str, *, skip: bool = False, no_eval: bool = True, **kwargs: Any) -> list[str]:
        stage = kwargs.pop("stage", "") + ('on_error = "skip"\n' if skip else "")
        if skip:  # one bad record of four is more than the default share
            stage += "max_skip_fraction = 0.5\n"
        return ["train", "--config", str(self.train_config(data, stage=stage, **kwargs)),
                *(["--no-eval"] if no_eval else [])]

    @property
    def eval_out(self) -> Path:
        return self.root / "eval-out"

    def eval(self, data: Path | str, *, model: Path | None = None, extra: tuple[str, ...] = ()) -> list[str]:
        return ["eval", "--model", str(model or self.saved_model), "--data", str(data), "--out", str(self.eval_out),
                *extra]

    def chat(self, question: str = "What colour is the square?", images: tuple[Path | str, ...] | None = None,
             model: Path | None = None) -> list[str]:
        shown = (self.image,) if images is None else images
        return ["chat", "--model", str(model or self.saved_model), *[a for p in shown for a in ("--image", str(p))],
                "--max-new-tokens", "2", question]

    # ---- what a failed command must not leave ---------------------------------------------
    def train_leftovers(self) -> tuple[Path, ...]:
        return (self.run_dir / "model", self.run_dir / "checkpoint")

    def eval_leftovers(self) -> tuple[Path, ...]:
        return (self.eval_out / "eval.json", self.eval_out / "report.html")
