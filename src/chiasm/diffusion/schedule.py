"""Noise schedules and the arithmetic of one denoising step, for DDPM and DDIM.

Everything a sampler needs lives here, in the notation of the papers: ``betas``, ``alphas``,
``alpha_bar`` (the cumulative product), the forward process q(x_t | x_0), the prediction of
x_0 from the network's output (epsilon- or v-prediction), the DDPM posterior q(x_{t-1} | x_t, x_0)
and the DDIM update. The network never sees this module and the sampler loop is elsewhere
(diffusers keeps its schedulers apart from its networks for the same reason). The values follow
diffusers' DDPMScheduler and DDIMScheduler step by step (tests/test_diffusion_schedule.py), so
a reader can trust each formula by comparing it with the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

BetaKind = Literal["linear", "cosine"]
Prediction = Literal["epsilon", "v"]
Spacing = Literal["leading", "trailing"]
SPACINGS: tuple[str, ...] = ("leading", "trailing")


@dataclass(frozen=True)
class ScheduleConfig:
    """Which schedule and what the network predicts; saved with every model."""

    kind: BetaKind = "linear"
    train_steps: int = 1000
    beta_start: float = 1e-4  # Ho et al.'s linear schedule
    beta_end: float = 0.02
    prediction: Prediction = "epsilon"
    clip_sample: bool = True  # clamp the predicted x_0 to the data range [-1, 1]


def make_betas(cfg: ScheduleConfig) -> torch.Tensor:
    """Linear (Ho et al. 2020) or cosine (Nichol & Dhariwal 2021, betas capped at 0.999) betas, float32."""
    if cfg.kind == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, cfg.train_steps, dtype=torch.float32)
    if cfg.kind == "cosine":
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        n = cfg.train_steps
        return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                            dtype=torch.float32)
    raise ValueError(f"unknown beta schedule {cfg.kind!r}; known: linear, cosine")


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped to broadcast over a batch ``like`` (B, C, H, W)."""
    out = values.to(like.device)[t.to(values.device).long()] if t.dim() else values[int(t)].to(like.device)
    return out.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """Alphas and the formulas that use them; ``t`` is an integer tensor (one per sample, or a scalar)."""

    def __init__(self, cfg: ScheduleConfig) -> None:
        self.cfg = cfg
        self.betas = make_betas(cfg)
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cumprod(self.alphas, dim=0)

    @property
    def train_steps(self) -> int:
        return self.cfg.train_steps

    def alpha_bar_at(self, t: int) -> float:
        """alpha_bar_t, and 1 for t < 0 (the clean image after the last step, DDIM's ``set_alpha_to_one``)."""
        return 1.0 if t < 0 else float(self.alpha_bar[t])

    # --- forward process and training target ---------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps: q(x_t | x_0) in one jump."""
        a = _at(self.alpha_bar, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network learns to output: eps, or v = sqrt(a) eps - sqrt(1 - a) x_0 (Salimans & Ho 2022)."""
        if self.cfg.prediction == "epsilon":
            return noise
        a = _at(self.alpha_bar, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of each step in ``t``."""
        a = self.alpha_bar[t.long()]
        return a / (1 - a)

    def loss_weights(self, t: torch.Tensor, min_snr_gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023), one per sample: min(SNR, gamma) / SNR for eps,
        min(SNR, gamma) / (SNR + 1) for v. The nearly clean steps, whose high SNR makes them easy but
        loud in a plain MSE, stop pulling the network away from the noisy ones; the paper reports
        convergence several times faster."""
        snr = self.snr(t)
        clipped = snr.clamp(max=min_snr_gamma)
        return clipped / snr if self.cfg.prediction == "epsilon" else clipped / (snr + 1)

    # --- from the network's output to x_0 and eps ----------------------------------
    def split(self, output: torch.Tensor, x_t: torch.Tensor, a_t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_0, eps) implied by the network's output at a noise level alpha_bar_t = ``a_t``."""
        if self.cfg.prediction == "epsilon":
            eps = output
            x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        else:
            x0 = math.sqrt(a_t) * x_t - math.sqrt(1 - a_t) * output
            eps = math.sqrt(a_t) * output + math.sqrt(1 - a_t) * x_t
        return x0, eps

    def limit_x0(self, x0: torch.Tensor, threshold: float | None = None, max_value: float = 1.0) -> torch.Tensor:
        """The predicted x_0 kept in the data range: clamped to [-1, 1] (``clip_sample``) or, with
        ``threshold`` (a percentile such as 0.995), Imagen's dynamic thresholding (Saharia et al.
        2022): per sample, s = that percentile of |x_0| within [1, ``max_value``], and x_0 is clamped
        to [-s, s] and divided by s. Strong guidance pushes x_0 far outside the data range; a
        plain clamp then saturates every such pixel, while the rescale keeps their contrasts."""
        if threshold is not None:
            flat = x0.reshape(x0.shape[0], -1).abs().float()
            s = torch.quantile(flat, threshold, dim=1).clamp(min=1.0, max=max_value)
            s = s.to(x0.dtype).reshape(-1, *([1] * (x0.dim() - 1)))
            return x0.clamp(-s, s) / s
        return x0.clamp(-1, 1) if self.cfg.clip_sample else x0

    # --- DDPM ---------------------------------------------------------------------
    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int) -> tuple[torch.Tensor, float]:
        """Mean and variance of q(x_{t_prev} | x_t, x_0) (Ho et al. eq. 7, for any earlier step t_prev).

        The variance is beta-tilde, the "fixed small" choice; with strided steps the beta of the
        jump is 1 - alpha_bar_t / alpha_bar_prev.
        """
        a_t, a_prev = self.alpha_bar_at(t), self.alpha_bar_at(t_prev)
        beta = 1 - a_t / a_prev
        mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)) * x_t
        var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
        return mean, var

    def ddpm_step(self, output: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int,
                  noise: torch.Tensor | None, limit: Callable[[torch.Tensor], torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ancestral step x_t -> x_{t_prev}; returns it and the predicted x_0. No noise at the last step.

        ``limit``: what keeps the predicted x_0 in range (default :meth:`limit_x0`).
        """
        x0, _ = self.split(output, x_t, self.alpha_bar_at(t))
        x0 = (limit or self.limit_x0)(x0)
        mean, var = self.posterior(x0, x_t, t, t_prev)
        if t > 0:
            if noise is None:
                raise ValueError("ddpm_step needs noise for t > 0")
            mean = mean + math.sqrt(var) * noise
        return mean, x0

    # --- DDIM ---------------------------------------------------------------------
    def ddim_sigma(self, t: int, t_prev: int, eta: float) -> float:
        """sigma_t of Song et al. eq. 16: 0 makes DDIM deterministic, eta = 1 gives DDPM's variance."""
        a_t, a_prev = self.alpha_bar_at(t), self.alpha_bar_at(t_prev)
        return eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))

    def ddim_step(self, output: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, eta: float,
                  noise: torch.Tensor | None, limit: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  consistent_eps: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x_{t_prev} = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (Song et al. eq. 12).

        ``consistent_eps``: eps re-derived from the limited x_0 (diffusers'
        ``use_clipped_model_output``), so the step's direction agrees with the x_0 it moves to;
        otherwise the network's eps is kept, as diffusers does by default.
        """
        a_t, a_prev = self.alpha_bar_at(t), self.alpha_bar_at(t_prev)
        x0, eps = self.split(output, x_t, a_t)
        x0 = (limit or self.limit_x0)(x0)
        if consistent_eps:
            eps = (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        sigma = self.ddim_sigma(t, t_prev, eta)
        prev = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if eta > 0:
            if noise is None:
                raise ValueError("ddim_step with eta > 0 needs noise")
            prev = prev + sigma * noise
        return prev, x0

    # --- which steps a sampler visits ----------------------------------------------
    def timesteps(self, steps: int, spacing: Spacing = "leading") -> list[int]:
        """``steps`` evenly spaced training steps, high to low.

        ``leading`` (diffusers' default) starts at 0 and counts up by T // steps, so a 50-step
        trajectory of 1,000 begins at t = 980 with pure noise; ``trailing`` (Lin et al. 2024,
        "Common diffusion noise schedules and sample steps are flawed") counts down from
        T - 1, so the first step sees the noise level it was trained on; the two are
        diffusers' ``timestep_spacing`` of the same names.
        """
        if not 1 <= steps <= self.train_steps:
            raise ValueError(f"steps must be in 1..{self.train_steps} (the training steps), got {steps}")
        if spacing == "leading":
            ratio = self.train_steps // steps
            return [i * ratio for i in range(steps)][::-1]
        if spacing == "trailing":
            ratio = self.train_steps / steps
            return [round(self.train_steps - i * ratio) - 1 for i in range(steps)]
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(SPACINGS)}")

    def trajectory(self, steps: int, spacing: Spacing = "leading") -> list[tuple[int, int]]:
        """The visited steps as (t, t_prev) pairs: each step's next is the next visited one, -1 after
        the last (the clean image). For an even split of T this is diffusers' t - T // steps."""
        visits = self.timesteps(steps, spacing)
        return list(zip(visits, [*visits[1:], -1], strict=True))
