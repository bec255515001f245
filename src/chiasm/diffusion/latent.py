"""The first stage of latent diffusion: train the small VAE, then turn the data into scaled latents."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chiasm.diffusion.vae import SmallVAE, VAEConfig, pad_to

log = logging.getLogger(__name__)


def train_vae(vae: SmallVAE, images: torch.Tensor, cfg: VAEConfig, seed: int, metrics: Path) -> None:
    """Adam on reconstruction + KL; images are padded to a side the VAE halves cleanly."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    vae.train()
    start = time.perf_counter()
    with metrics.open("a") as f:
        for step in range(1, cfg.steps + 1):
            idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
            x, _ = pad_to(images[idx], vae.pad_multiple)
            loss, parts = vae.loss(x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0 or step == cfg.steps:
                rec = {"stage": "vae", "step": step, "loss": float(loss.detach()), **parts,
                       "elapsed": round(time.perf_counter() - start, 2)}
                f.write(json.dumps(rec) + "\n")
                f.flush()
                log.info("vae step %d/%d loss %.4f (rec %.4f, kl %.3f)", step, cfg.steps, float(loss),
                         parts["rec"], parts["kl"])
    vae.eval()


@torch.no_grad()
def encode_all(vae: SmallVAE, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Posterior means of every image (unscaled)."""
    out = []
    for i in range(0, len(images), batch):
        x, _ = pad_to(images[i:i + batch], vae.pad_multiple)
        out.append(vae.encode(x)[0])
    return torch.cat(out)


def latent_scale(latents: torch.Tensor) -> float:
    """1 / std of the latents: after scaling they have unit variance, as Stable Diffusion's scaling_factor does."""
    return float(1.0 / latents.flatten().std())


def reused_vae(source: str | Path) -> Path:
    """The vae.safetensors that ``source`` names: the file itself, or a run or model folder holding one."""
    path = Path(source)
    found = path if path.is_file() else path / "vae.safetensors"
    if not found.is_file():
        raise FileNotFoundError(f"latent.vae_from: no VAE at {path} (a vae.safetensors file, or a run or model "
                                "folder that holds one)")
    return found


def prepare_vae(vae: SmallVAE, images: torch.Tensor, cfg: VAEConfig, seed: int, run_dir: Path,
                reuse: str | Path | None = None) -> None:
    """Put the run's VAE in RUN/vae.safetensors (one process does this): copied from ``reuse``, kept
    from an earlier attempt (so a resume skips training it), or trained now."""
    path = run_dir / "vae.safetensors"
    if reuse is not None:
        source = reused_vae(reuse)
        try:
            vae.load_state_dict(load_file(str(source)))
        except RuntimeError as e:
            raise ValueError(f"latent.vae_from: {source} does not fit [latent.vae] of this config: {e}") from None
        log.info("vae: reused %s", source)
        if source.resolve() != path.resolve():
            save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
    elif not path.is_file():
        train_vae(vae, images, cfg, seed, run_dir / "metrics.jsonl")
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))


def vae_stage(vae: SmallVAE, images: torch.Tensor, run_dir: Path) -> tuple[torch.Tensor, float]:
    """Every process: the run's VAE (see :func:`prepare_vae`) loaded, and the data encoded with it;
    the latents scaled to unit variance and the scale."""
    path = run_dir / "vae.safetensors"
    vae.load_state_dict(load_file(str(path)))
    vae.eval()
    log.info("vae: loaded %s", path)
    z = encode_all(vae, images)
    scale = latent_scale(z)
    return z * scale, scale
