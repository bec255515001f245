"""Pictures of diffusion: the forward process, the reverse process, sample grids, the w sweep, the loss.

PNG files in the run or output folder; the HTML report embeds them. Images in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from chiasm.diffusion.model import DiffusionModel
from chiasm.diffusion.sampler import SampleOptions
from chiasm.report.plots import save_figure

CELL_PX = 56


def to_pil(x: torch.Tensor, px: int = CELL_PX) -> Image.Image:
    """One image (C, H, W) in [-1, 1] as an upscaled (nearest) PIL image."""
    arr = ((x.detach().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    return img.resize((px, px), Image.NEAREST)


def image_grid(images: torch.Tensor, columns: int, px: int = CELL_PX) -> Image.Image:
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * (px + 2), rows * (px + 2)), (255, 255, 255))
    for i, x in enumerate(images):
        grid.paste(to_pil(x, px).convert("RGB"), ((i % columns) * (px + 2), (i // columns) * (px + 2)))
    return grid


def save_image_grid(images: torch.Tensor, path: Path, columns: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns).save(path)
    return path


def forward_process(model: DiffusionModel, images: torch.Tensor, ts: list[int], path: Path, seed: int = 0) -> Path:
    """Each row one image, each column x_t for a chosen t (q(x_t | x_0), one jump from the clean image)."""
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for t in ts:
        noise = torch.randn(images.shape, generator=gen)
        cols.append(model.schedule.add_noise(images, noise, torch.full((len(images),), t)) if t >= 0 else images)
    stacked = torch.stack(cols, dim=1).reshape(-1, *images.shape[1:])
    return save_image_grid(stacked, path, columns=len(ts))


def reverse_process(model: DiffusionModel, path: Path, *, labels: list[int] | None, prompts: list[str] | None,
                    opts: SampleOptions, frames: int = 10, seed: int = 0) -> Path:
    """Each row one sample, each column x_t along its denoising (the last column the result)."""
    n = len(labels) if labels is not None else len(prompts or []) or 4
    visits = model.schedule.timesteps(opts.steps, opts.spacing)
    keep = {visits[round(i * (len(visits) - 1) / (frames - 1))] for i in range(frames)}
    shots: list[torch.Tensor] = []

    def grab(t: int, x: torch.Tensor, _x0: torch.Tensor) -> None:
        if t in keep:
            shots.append(model.decode(x))

    model.generate(n, opts, labels=labels, prompts=prompts, generator=torch.Generator().manual_seed(seed),
                   on_step=grab)
    stacked = torch.stack(shots, dim=1).reshape(-1, *shots[0].shape[1:])
    return save_image_grid(stacked, path, columns=len(shots))


def plot_sweep(result: dict[str, Any], path: Path) -> Path | None:
    """FID and recognition against w: the CFG paper's trade-off (fidelity up, diversity down)."""
    from matplotlib.figure import Figure

    rows = result.get("sweep") or []
    if not rows:
        return None
    fid = result["fid_name"]
    ws = [r["guidance"] for r in rows]
    fig = Figure(figsize=(10, 3.6))
    ax = fig.subplots(1, 2)
    ax[0].plot(ws, [r[fid] for r in rows], "o-", color="C0", label=fid)
    ax[0].set_xlabel("guidance scale w")
    ax[0].set_ylabel(f"{fid} (lower is better)")
    if "recognition" in rows[0]:
        twin = ax[0].twinx()
        twin.plot(ws, [100 * r["recognition"] for r in rows], "s-", color="C3", label="recognised as asked")
        twin.set_ylabel("recognised as asked (%)", color="C3")
    ax[1].plot([r["recall"] for r in rows], [r["precision"] for r in rows], "o-", color="C2")
    for r in rows:
        ax[1].annotate(f"w={r['guidance']:g}", (r["recall"], r["precision"]), fontsize=8)
    ax[1].set_xlabel("recall (diversity)")
    ax[1].set_ylabel("precision (fidelity)")
    fig.suptitle("classifier-free guidance sweep")
    return save_figure(fig, path)


def plot_loss(run_dir: Path, path: Path) -> Path | None:
    """Training loss of the denoiser (and of the VAE, for latent diffusion) from RUN/metrics.jsonl."""
    from matplotlib.figure import Figure

    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    stages = sorted({r["stage"] for r in rows})
    fig = Figure(figsize=(5 * len(stages), 3.4))
    axes = fig.subplots(1, len(stages), squeeze=False)
    for ax, stage in zip(axes[0], stages, strict=True):
        pts = [(r["step"], r["loss"]) for r in rows if r["stage"] == stage]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_yscale("log")
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
    return save_figure(fig, path)


