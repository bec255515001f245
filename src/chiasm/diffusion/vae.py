"""A small KL-regularised autoencoder (the "first stage" of latent diffusion, Rombach et al. 2022).

Four times smaller per side: a 32 x 32 image becomes an 8 x 8 x 4 latent, 16x fewer positions
for the UNet to convolve over, which is where latent diffusion's speed comes from. The KL
term is weak (as in Stable Diffusion's f=8 KL models): it keeps the latent space smooth and
bounded without blurring the reconstructions. Latents are scaled by one number so that
their standard deviation is 1, the scale the noise schedule assumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class VAEConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64])  # one stride-2 level per entry
    latent_channels: int = 4
    kl_weight: float = 1e-4
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class SmallVAE(nn.Module):
    """encode(x) -> (mean, logvar) of q(z | x); decode(z) -> x in [-1, 1]."""

    def __init__(self, cfg: VAEConfig, in_channels: int) -> None:
        super().__init__()
        ch = cfg.channels
        enc: list[nn.Module] = []
        cin = in_channels
        for c in ch:
            enc += [_block(cin, c), nn.Conv2d(c, c, 3, stride=2, padding=1)]
            cin = c
        self.encoder = nn.Sequential(*enc, nn.Conv2d(cin, 2 * cfg.latent_channels, 1))
        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)]
        cin = ch[-1]
        for c in reversed(ch):
            dec += [_block(cin, c), nn.Upsample(scale_factor=2, mode="nearest")]
            cin = c
        self.decoder = nn.Sequential(*dec, _block(cin, cin), nn.Conv2d(cin, in_channels, 3, padding=1))
        self.factor = 2 ** len(ch)
        self.pad_multiple = self.factor  # images are padded to a side divisible by this (see DiffusionModel)
        self.kl_weight = cfg.kl_weight

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30, 20)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(z))

    def loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Reconstruction (L1 + MSE) plus the KL divergence to N(0, I), per element."""
        mean, logvar = self.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)
        rec = self.decode(z)
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return rec_loss + self.kl_weight * kl, {"rec": float(rec_loss.detach()), "kl": float(kl.detach())}


def pad_to(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """Pad a batch with background (-1) to a side divisible by ``multiple``; returns it and the pad per side."""
    side = x.shape[-1]
    target = -(-side // multiple) * multiple
    p = (target - side) // 2
    return (F.pad(x, (p, target - side - p, p, target - side - p), value=-1.0) if target != side else x), p


def crop(x: torch.Tensor, pad: int, side: int) -> torch.Tensor:
    return x[..., pad:pad + side, pad:pad + side]
