"""Run several configs in one torchrun process group (one launch per test file keeps tests quick).

Usage: ``torchrun --nproc-per-node 2 tests/dist_worker.py OUT CONFIG.json [CONFIG.json@N ...]``;
``@N`` stops the run after N optimizer steps (as if killed) and resumes it. After each run
every rank writes its whole model to ``OUT/<config stem>.rank<r>.safetensors``, so a test
can check that the ranks ended with the same weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from chiasm.config import load_config
from chiasm.train.trainer import Interrupted, Trainer

torch.set_num_threads(1)


def main(out: str, *configs: str) -> None:
    for spec in configs:
        path, _, stop = spec.partition("@")
        if stop:
            try:
                Trainer(load_config(path), show_progress=False).run(stop_after_steps=int(stop))
                raise AssertionError(f"{path}: the run ended before step {stop}")
            except Interrupted:
                pass
        trainer = Trainer(load_config(path), show_progress=False)
        model = trainer.run(resume=bool(stop))
        state = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        save_file(state, str(Path(out) / f"{Path(path).stem}.rank{trainer.dist.rank}.safetensors"))


if __name__ == "__main__":
    main(*sys.argv[1:])
