"""A trained diffusion model as a folder: config, EMA weights, class names, and the latent stage.

``model/`` holds ``config.json`` (the run's resolved config), ``unet.safetensors`` (the EMA
weights, what samples), ``meta.json`` (class names, image shape, latent scale) and, for latent
diffusion, ``vae.safetensors``. Loading needs nothing else: no hub, no pickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from chiasm.config import from_dict
from chiasm.diffusion.config import DiffusionConfig
from chiasm.diffusion.network import Denoiser, concat_conditions
from chiasm.diffusion.sampler import SampleOptions, guided, sample
from chiasm.diffusion.schedule import NoiseSchedule
from chiasm.diffusion.vae import SmallVAE, crop
from chiasm.errors import ModelFolderError


class DiffusionModel:
    """Everything sampling needs; ``generate`` returns images in [-1, 1] at the data's size."""

    def __init__(self, cfg: DiffusionConfig, classes: list[str], net: Denoiser, vae: SmallVAE | None = None,
                 latent_scale: float = 1.0) -> None:
        self.cfg, self.classes, self.net, self.vae, self.latent_scale = cfg, classes, net, vae, latent_scale
        self.schedule = NoiseSchedule(cfg.schedule)
        self._text: Any = None

    # --- shape of what the UNet sees ------------------------------------------------
    @staticmethod
    def net_shape(cfg: DiffusionConfig) -> tuple[int, int]:
        """(channels, side) of the UNet's input: the image, or the VAE's latent."""
        if cfg.latent.enabled:
            multiple = DiffusionModel.pad_multiple(cfg)
            side = -(-cfg.data.size // multiple) * multiple // 2 ** len(cfg.latent.vae.channels)
            return cfg.latent.vae.latent_channels, side
        return cfg.data.channels, cfg.data.size

    @staticmethod
    def pad_multiple(cfg: DiffusionConfig) -> int:
        """Images go into the VAE padded to a side that the VAE and then every UNet level halve evenly."""
        return 2 ** len(cfg.latent.vae.channels) * 2 ** (len(cfg.net.channels) - 1)

    @classmethod
    def build(cls, cfg: DiffusionConfig, classes: list[str]) -> DiffusionModel:
        channels, side = cls.net_shape(cfg)
        net = Denoiser(cfg.net, channels, side, num_classes=len(classes))
        vae = SmallVAE(cfg.latent.vae, cfg.data.channels) if cfg.latent.enabled else None
        if vae is not None:
            vae.pad_multiple = cls.pad_multiple(cfg)
        return cls(cfg, classes, net, vae)

    @property
    def text(self) -> Any:
        if self._text is None:
            from chiasm.diffusion.text import TextTower

            self._text = TextTower(self.cfg.text_tower, self.cfg.text_max_tokens)
        return self._text

    # --- conditions -----------------------------------------------------------------
    def class_index(self, name_or_index: str | int) -> int:
        """A class given by name or number; an unknown one is an error listing the known classes."""
        if isinstance(name_or_index, int) or str(name_or_index).isdigit():
            i = int(name_or_index)
            if 0 <= i < len(self.classes):
                return i
        elif name_or_index in self.classes:
            return self.classes.index(name_or_index)
        raise ValueError(f"unknown class {name_or_index!r}; this model knows {len(self.classes)}: "
                         + ", ".join(f"{i}={c}" for i, c in enumerate(self.classes)))

    def conditions(self, labels: list[int] | None = None, prompts: list[str] | None = None) -> tuple[Any, Any]:
        """(condition, null condition) for a batch, in the form the network takes."""
        kind = self.cfg.net.conditioning
        if kind == "class":
            if labels is None:
                raise ValueError("this model is class-conditional: give a class (--class)")
            c = torch.tensor(labels, dtype=torch.long)
            return c, torch.full_like(c, self.net.null_class)
        if kind == "text":
            if prompts is None:
                raise ValueError("this model is text-conditional: give a prompt (--prompt)")
            for p in prompts:
                self.text.check(p)
            return self.text.encode(prompts), self.text.null(len(prompts))
        return None, None

    # --- sampling -------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, n: int, opts: SampleOptions, *, labels: list[int] | None = None,
                 prompts: list[str] | None = None, generator: torch.Generator | None = None,
                 on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        cond, null = self.conditions(labels, prompts)
        self.net.eval()
        call = guided(self.net, cond, null, opts.guidance, concat_conditions)
        channels, side = self.net_shape(self.cfg)
        x = sample(call, self.schedule, (n, channels, side, side), opts, generator, on_step=on_step)
        return self.decode(x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents -> images (cropped back to the data's size); images pass through, clamped."""
        if self.vae is None:
            return x.clamp(-1, 1)
        out = self.vae.decode(x / self.latent_scale)
        pad = (out.shape[-1] - self.cfg.data.size) // 2
        return crop(out, pad, self.cfg.data.size).clamp(-1, 1)

    # --- files ----------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        (folder / "meta.json").write_text(json.dumps({"classes": self.classes, "latent_scale": self.latent_scale},
                                                     indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "unet.safetensors"))
        if self.vae is not None:
            save_file({k: v.contiguous() for k, v in self.vae.state_dict().items()}, str(folder / "vae.safetensors"))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> DiffusionModel:
        folder = Path(folder)
        if not folder.is_dir():
            raise ModelFolderError(f"model folder not found: {folder}")
        for name in ("config.json", "meta.json", "unet.safetensors"):
            if not (folder / name).is_file():
                raise ModelFolderError(f"{folder} is not a diffusion model folder: {name} is missing "
                                       "(chiasm diffusion train writes RUN/model)")
        cfg = from_dict(DiffusionConfig, json.loads((folder / "config.json").read_text()))
        meta = json.loads((folder / "meta.json").read_text())
        model = cls.build(cfg, meta["classes"])
        model.latent_scale = float(meta["latent_scale"])
        model.net.load_state_dict(load_file(str(folder / "unet.safetensors")))
        if model.vae is not None:
            model.vae.load_state_dict(load_file(str(folder / "vae.safetensors")))
        model.net.eval()
        return model
