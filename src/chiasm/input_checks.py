"""The files a run reads, checked before its model is built.

A data file that is missing, or a broken record in the data of a run's last stage, would
otherwise surface only when that stage starts: after the model was loaded and every earlier
stage trained. Reading each data file once more up front costs a parse and a file-existence
check per image, small next to what a late failure loses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from chiasm.config import EvalConfig, RunConfig
from chiasm.config_checks import raise_problems
from chiasm.data.llava import LoadResult, load_llava
from chiasm.data.sample import DataError
from chiasm.train.skips import SkipLog


def _path_problems(where: str, path: str | None, *, folder: bool = False) -> list[str]:
    if path is None or not path.strip():
        return []
    p = Path(path)
    if not p.exists():
        return [f"{where}: {'folder' if folder else 'file'} not found: {p}"]
    if folder and not p.is_dir():
        return [f"{where}: {p} is a file, not a folder"]
    if not folder and not p.is_file():
        return [f"{where}: {p} is a folder, not a data file"]
    return []


def _output_problems(output_dir: str) -> list[str]:
    """The run folder must be a folder or creatable as one: a file in its place fails after the model is built."""
    out = Path(output_dir)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                return [f"output_dir: {out} cannot be a folder: {p} is a file"]
            return []
    return []


def check_run_inputs(cfg: RunConfig, what: str, *, with_eval: bool) -> None:
    """Raise a ConfigError naming every missing data file or image root, then read every data file.

    A file's first bad record raises its :class:`DataError` (file, sample, line); under a stage's
    ``on_error = "skip"`` bad records are left to the stage, but a file with no usable record, or
    more bad ones than the stage's ``max_skip_fraction``, is an error here. ``with_eval``: the eval
    set is read too (a run that evaluates at its end).
    """
    problems = []
    for i, stage in enumerate(cfg.stages):
        problems += _path_problems(f"stages[{i}].data", stage.data)
        problems += _path_problems(f"stages[{i}].image_root", stage.image_root, folder=True)
    problems += _output_problems(cfg.output_dir)
    if with_eval:
        problems += _path_problems("eval.data", cfg.eval.data)
        problems += _path_problems("eval.image_root", cfg.eval.image_root, folder=True)
    raise_problems(problems, what)
    for stage in cfg.stages:
        result = _read(stage.data, stage.image_root, stage.on_error, stage.allow_outside_image_root)
        # The stage's own bound on skipped records, for those found by reading: no model is built for a
        # stage that would stop on them (its broken images are counted later, when decoded).
        skips = SkipLog(stage.name, stage.data, len(result.samples) + len(result.skipped), stage.max_skip_fraction)
        for sample_id, reason in result.skipped:
            skips.add(sample_id, reason)
        skips.check()
    if with_eval and cfg.eval.data:
        _read(cfg.eval.data, cfg.eval.image_root, "raise", cfg.eval.allow_outside_image_root)


def _read(data: str, root: str | None, on_error: Literal["raise", "skip"], outside: bool) -> LoadResult:
    result = load_llava(data, root, on_error=on_error, allow_outside_root=outside)
    if not result.samples and result.skipped:
        raise DataError(f"every record is invalid ({len(result.skipped)} skipped under on_error = 'skip'); "
                        f"the first: {result.skipped[0][1]}", source=data)
    if not result.samples:
        raise DataError("the data file holds no records", source=data)
    return result


def check_eval_inputs(cfg: EvalConfig) -> None:
    """``chiasm eval``'s data file and image root checked, and the file read, before the model loads."""
    from chiasm.eval.evaluate import eval_samples  # it imports the model

    raise_problems(_path_problems("--data", cfg.data) + _path_problems("--image-root", cfg.image_root, folder=True),
                   "eval options")
    if cfg.data:
        eval_samples(cfg)
