"""Two gloo ranks train the same model as one process with the same global batch.

The losses of every step agree to float tolerance. Weights agree to within one Adam step:
a conv bias that feeds a GroupNorm has an exact gradient of zero (the norm removes it), so
its float noise, different in a different summation order, is what Adam's first steps follow.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


def _cfg(out: Path):
    from chiasm.diffusion.config import DiffusionConfig
    from chiasm.diffusion.network import NetConfig

    cfg = DiffusionConfig(output_dir=str(out))
    cfg.data.source, cfg.data.size, cfg.data.n_train = "digits", 8, 64
    cfg.net = NetConfig(channels=[8, 16], attention=False)
    cfg.schedule = type(cfg.schedule)(train_steps=50)
    cfg.train.steps, cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.warmup_steps = 3, 8, 3, 1
    cfg.train.log_every = 1
    cfg.train.backend = "gloo"
    return cfg


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from chiasm.diffusion.train import train

    train(_cfg(Path(out)))
    torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from chiasm.diffusion.train import train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(tmp_path / "ddp")), nprocs=2, join=True, start_method="fork")
    single = train(_cfg(tmp_path / "one"))
    ddp = load_file(str(tmp_path / "ddp" / "model" / "unet.safetensors"))
    for k, v in single.net.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=0, atol=single.cfg.train.lr, msg=k)

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("one")) == 3
    assert losses("ddp") == pytest.approx(losses("one"), rel=1e-5)
