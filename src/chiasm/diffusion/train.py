"""Training a diffusion model: sample t and noise, predict the target, MSE; EMA; checkpoints; torchrun.

One function runs the whole recipe: (for latent diffusion) the VAE stage and the encoding of
the data, then the denoiser. Under torchrun every rank draws the same global batch from the
same seeded generator and trains on its own slice, so the data order, and the checkpoint's
RNG state, do not depend on the number of processes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chiasm.diffusion import checkpoint
from chiasm.diffusion.config import DiffusionConfig
from chiasm.diffusion.data import ImageSet, load_dataset
from chiasm.diffusion.ema import EMA
from chiasm.diffusion.latent import prepare_vae, vae_stage
from chiasm.diffusion.model import DiffusionModel
from chiasm.diffusion.network import drop_conditions
from chiasm.diffusion.schedule import NoiseSchedule
from chiasm.train.dist import all_reduce_mean, barrier, init_distributed

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: DiffusionConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def training_inputs(model: DiffusionModel, data: ImageSet, run_dir: Path, is_main: bool) -> tuple[torch.Tensor, Any]:
    """What the UNet learns to denoise (pixels or scaled latents) and every sample's condition."""
    x = data.images
    if model.vae is not None:
        if is_main:
            prepare_vae(model.vae, x, model.cfg.latent.vae, model.cfg.train.seed, run_dir, model.cfg.latent.vae_from)
        barrier()  # the other ranks read the VAE that rank 0 trained (or copied)
        x, model.latent_scale = vae_stage(model.vae, x, run_dir)
    kind = model.cfg.net.conditioning
    if kind == "class":
        return x, data.labels
    if kind == "text":
        emb, mask = model.text.encode(data.captions)
        return x, (emb, mask)
    return x, None


def _take(cond: Any, idx: torch.Tensor) -> Any:
    if cond is None:
        return None
    return tuple(c[idx] for c in cond) if isinstance(cond, tuple) else cond[idx]


def train(cfg: DiffusionConfig, *, resume: bool = False, stop_after: int | None = None) -> DiffusionModel:
    """Run the recipe into ``cfg.output_dir``; returns the model with EMA weights (saved in RUN/model).

    ``stop_after`` ends the run after that step with a checkpoint, as a kill right after a save
    would (the resume tests and benchmarks use it).
    """
    info = init_distributed(cfg.train.backend)
    run_dir = Path(cfg.output_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
        if not resume:
            for stale in ("metrics.jsonl", "vae.safetensors"):
                (run_dir / stale).unlink(missing_ok=True)
    barrier()
    if cfg.train.batch_size % info.world:
        raise ValueError(f"train.batch_size {cfg.train.batch_size} does not split over {info.world} processes")
    torch.manual_seed(cfg.train.seed)
    data = load_dataset(cfg.data.source, "train", root=cfg.data.root, size=cfg.data.size,
                        channels=cfg.data.channels, n=cfg.data.n_train, seed=cfg.train.seed)
    model = DiffusionModel.build(cfg, data.classes)
    x_all, cond_all = training_inputs(model, data, run_dir, info.is_main)
    net = model.net.to(info.device)
    null_all = model.conditions(labels=[0], prompts=None)[1] if cfg.net.conditioning == "class" else None
    if cfg.net.conditioning == "text":
        null_all = model.text.null(1)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(cfg.train.seed)
    ema = EMA(net, cfg.train.ema_decay)
    start = 0
    ckpt = run_dir / "checkpoint"
    if resume:
        found = checkpoint.recover(ckpt)
        if found is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} (expected {ckpt}/state.json)")
        start, ema.shadow, ema.updates = checkpoint.load(found, net, opt, rng)
        log.info("resumed from %s at step %d", found, start)
    wrapped: torch.nn.Module = net
    if info.world > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
    schedule = model.schedule
    share = cfg.train.batch_size // info.world
    mine = slice(info.rank * share, (info.rank + 1) * share)
    net.train()
    t0, seen = time.perf_counter(), 0.0
    metrics = (run_dir / "metrics.jsonl").open("a") if info.is_main else None
    for step in range(start, cfg.train.steps):
        idx = torch.randint(0, len(x_all), (cfg.train.batch_size,), generator=rng)
        x0 = x_all[idx]
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(0, schedule.train_steps, (cfg.train.batch_size,), generator=rng)
        null = None
        if null_all is not None:
            null = tuple(n.expand(len(idx), *n.shape[1:]) for n in null_all) if isinstance(null_all, tuple) \
                else null_all.expand(len(idx))
        cond = drop_conditions(_take(cond_all, idx), null, cfg.net.cond_dropout, rng)
        x0, noise, t, cond = x0[mine], noise[mine], t[mine], _take(cond, torch.arange(len(idx))[mine])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        tick = time.perf_counter()
        out = wrapped(schedule.add_noise(x0, noise, t).to(info.device), t.to(info.device),
                      _to(cond, info.device))
        loss = diffusion_loss(out, schedule.target(x0, noise, t).to(info.device), schedule, t,
                              cfg.train.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        ema.update(net)
        seen += time.perf_counter() - tick
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            value = all_reduce_mean(float(loss.detach()))
            if metrics is not None:
                metrics.write(json.dumps({"stage": "diffusion", "step": done, "loss": value, "lr": lr_at(step, cfg),
                                          "step_seconds": seen / max(1, done - start),
                                          "elapsed": round(time.perf_counter() - t0, 2)}) + "\n")
                metrics.flush()
                log.info("step %d/%d loss %.4f (%.3f s/step)", done, cfg.train.steps, value,
                         seen / max(1, done - start))
        if done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps or done == stop_after:
            if info.is_main:
                checkpoint.save(ckpt, net, ema.shadow, ema.updates, opt, rng, done)
            barrier()
        if done == stop_after:
            break
    if metrics is not None:
        metrics.close()
    ema.copy_to(net)
    net.cpu().eval()
    if info.is_main:
        model.save(run_dir / "model")
    return model


def diffusion_loss(out: torch.Tensor, target: torch.Tensor, schedule: NoiseSchedule, t: torch.Tensor,
                   min_snr_gamma: float | None) -> torch.Tensor:
    """The batch's MSE to the target, each sample weighted by min-SNR-gamma when it is set."""
    if min_snr_gamma is None:
        return F.mse_loss(out, target)
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    return (schedule.loss_weights(t, min_snr_gamma).to(per_sample.device) * per_sample).mean()


def _to(cond: Any, device: torch.device) -> Any:
    if cond is None:
        return None
    return tuple(c.to(device) for c in cond) if isinstance(cond, tuple) else cond.to(device)
