"""Two gloo ranks train the same weights as one process with the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


def _cfg(out: Path):  # noqa: ANN202
    from chiasm.diffusion.config import DiffusionConfig
    from chiasm.diffusion.network import NetConfig

    cfg = DiffusionConfig(output_dir=str(out))
    cfg.data.source, cfg.data.size, cfg.data.n_train = "digits", 8, 64
    cfg.net = NetConfig(channels=[8, 16], attention=False)
    cfg.schedule = type(cfg.schedule)(train_steps=50)
    cfg.train.steps, cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.warmup_steps = 3, 8, 3, 1
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
    mp.spawn(_rank, args=(port, str(tmp_path / "ddp")), nprocs=2, join=True)
    single = train(_cfg(tmp_path / "one"))
    ddp = load_file(str(tmp_path / "ddp" / "model" / "unet.safetensors"))
    for k, v in single.net.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5, msg=k)
