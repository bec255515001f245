"""The schedule arithmetic against diffusers' DDPMScheduler and DDIMScheduler, step by step."""

from __future__ import annotations

import pytest
import torch

from chiasm.diffusion.sampler import SampleOptions, sample
from chiasm.diffusion.schedule import NoiseSchedule, ScheduleConfig

diffusers = pytest.importorskip("diffusers")

KINDS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
PRED = {"epsilon": "epsilon", "v": "v_prediction"}


def _cfg(kind: str, prediction: str, clip: bool) -> ScheduleConfig:
    return ScheduleConfig(kind=kind, prediction=prediction, clip_sample=clip)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_betas_and_forward_process(kind: str) -> None:
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=KINDS[kind])
    ours = NoiseSchedule(_cfg(kind, "epsilon", True))
    torch.testing.assert_close(ours.betas, ref.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.alpha_bar, ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    x0, noise = torch.randn(4, 1, 6, 6), torch.randn(4, 1, 6, 6)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    vref = diffusers.DDPMScheduler(beta_schedule=KINDS[kind], prediction_type="v_prediction")
    ours_v = NoiseSchedule(_cfg(kind, "v", True))
    torch.testing.assert_close(ours_v.target(x0, noise, t), vref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "prediction", "clip", "steps"),
                         [("linear", "epsilon", True, 1000), ("cosine", "v", False, 20), ("linear", "v", True, 50)])
def test_ddpm_steps_equal_diffusers(kind: str, prediction: str, clip: bool, steps: int) -> None:
    ref = diffusers.DDPMScheduler(beta_schedule=KINDS[kind], prediction_type=PRED[prediction], clip_sample=clip)
    ref.set_timesteps(steps)
    ours = NoiseSchedule(_cfg(kind, prediction, clip))
    assert ref.timesteps.tolist() == ours.timesteps(steps)
    prev = dict(ours.trajectory(steps))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=gen)
    for t in [*ours.timesteps(steps)[::max(1, steps // 10)], 0]:  # ten spots on the trajectory and the last step
        out = torch.randn(x.shape, generator=gen)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        want = ref.step(out, t, x, generator=torch.Generator().manual_seed(noise_seed)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed))
        got, _ = ours.ddpm_step(out, x, t, prev[t], noise)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "prediction", "eta", "steps"),
                         [("linear", "epsilon", 0.0, 50), ("cosine", "v", 0.5, 20), ("linear", "epsilon", 1.0, 10)])
def test_ddim_steps_equal_diffusers(kind: str, prediction: str, eta: float, steps: int) -> None:
    ref = diffusers.DDIMScheduler(beta_schedule=KINDS[kind], prediction_type=PRED[prediction], clip_sample=True)
    ref.set_timesteps(steps)
    ours = NoiseSchedule(_cfg(kind, prediction, True))
    assert ref.timesteps.tolist() == ours.timesteps(steps)
    prev = dict(ours.trajectory(steps))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 4, 4, generator=gen)
    for t in ours.timesteps(steps):
        out = torch.randn(x.shape, generator=gen)
        noise = torch.randn(x.shape, generator=gen)
        want = ref.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        got, _ = ours.ddim_step(out, x, t, prev[t], eta, noise)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        x = want  # walk the reference's trajectory


def test_whole_ddim_trajectory_equals_diffusers_loop() -> None:
    """Our loop with a fixed toy network against diffusers' loop over the same network."""
    cfg = _cfg("linear", "epsilon", True)
    net = lambda x, t: 0.3 * x + 1e-4 * t.float().reshape(-1, 1, 1, 1)  # noqa: E731
    got = sample(net, NoiseSchedule(cfg), (3, 1, 4, 4), SampleOptions("ddim", 25, spacing="leading"),
                 torch.Generator().manual_seed(5))
    ref = diffusers.DDIMScheduler(clip_sample=True)
    ref.set_timesteps(25)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    for t in ref.timesteps:
        x = ref.step(net(x, torch.full((3,), int(t))), t, x, use_clipped_model_output=True).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)
    raw = sample(net, NoiseSchedule(cfg), (3, 1, 4, 4), SampleOptions("ddim", 25, clipped_eps=False, spacing="leading"),
                 torch.Generator().manual_seed(5))
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    for t in ref.timesteps:
        x = ref.step(net(x, torch.full((3,), int(t))), t, x).prev_sample  # diffusers' default: the network's eps
    torch.testing.assert_close(raw, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [50, 20, 30, 7, 1000])
def test_trailing_timesteps_equal_diffusers(steps: int) -> None:
    ref = diffusers.DDIMScheduler(timestep_spacing="trailing")
    ref.set_timesteps(steps)
    visits = NoiseSchedule(ScheduleConfig()).timesteps(steps, "trailing")
    assert visits == ref.timesteps.tolist()
    assert visits[0] == 999 and len(set(visits)) == steps  # starts where x_T is pure noise
    pairs = NoiseSchedule(ScheduleConfig()).trajectory(steps, "trailing")
    assert [t for t, _ in pairs] == visits and [p for _, p in pairs] == [*visits[1:], -1]  # the next visited


@pytest.mark.parametrize(("kind", "eta"), [("cosine", 0.0), ("linear", 1.0)])
def test_whole_trailing_trajectory_equals_diffusers_loop(kind: str, eta: float) -> None:
    """The default spacing (trailing) walked by our loop and by diffusers' over the same toy network."""
    cfg = _cfg(kind, "epsilon", True)
    net = lambda x, t: 0.3 * x + 1e-4 * t.float().reshape(-1, 1, 1, 1)  # noqa: E731
    got = sample(net, NoiseSchedule(cfg), (3, 1, 4, 4), SampleOptions("ddim", 20, eta=eta),
                 torch.Generator().manual_seed(5))
    assert SampleOptions().spacing == "trailing"
    ref = diffusers.DDIMScheduler(beta_schedule=KINDS[kind], clip_sample=True, timestep_spacing="trailing")
    ref.set_timesteps(20)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 1, 4, 4, generator=gen)
    for t in ref.timesteps:
        out = net(x, torch.full((3,), int(t)))
        extra = {"variance_noise": torch.randn(x.shape, generator=gen)} if eta > 0 else {}
        x = ref.step(out, t, x, eta=eta, use_clipped_model_output=True, **extra).prev_sample
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_dynamic_thresholding_steps_equal_diffusers(sampler: str) -> None:
    """Imagen's dynamic thresholding (and DDIM's eps re-derived from the limited x_0) against diffusers."""
    steps = 20
    kind = diffusers.DDIMScheduler if sampler == "ddim" else diffusers.DDPMScheduler
    ref = kind(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.5)
    ref.set_timesteps(steps)
    ours = NoiseSchedule(_cfg("linear", "epsilon", True))
    prev = dict(ours.trajectory(steps))
    opts = SampleOptions(sampler, steps, threshold=0.9, threshold_max=2.5)
    limit = lambda x0: ours.limit_x0(x0, opts.threshold, opts.threshold_max)  # noqa: E731
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 6, 6, generator=gen)
    for t in [*ours.timesteps(steps)[::4], 0]:
        out = 4.0 * torch.randn(x.shape, generator=gen)  # x_0 far out of the data range
        seed = int(torch.randint(0, 2**31, (1,), generator=gen))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        if sampler == "ddim":
            want = ref.step(out, t, x, use_clipped_model_output=True).prev_sample
            got, _ = ours.ddim_step(out, x, t, prev[t], 0.0, None, limit, consistent_eps=True)
        else:
            want = ref.step(out, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
            got, _ = ours.ddpm_step(out, x, t, prev[t], noise, limit)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert SampleOptions(sampler, steps).threshold is None  # off by default: the schedule's plain clamp
    with pytest.raises(ValueError, match="--threshold is a percentile"):
        SampleOptions(sampler, steps, threshold=99.5).check(1000)


def test_bad_sampling_options() -> None:
    sched = NoiseSchedule(ScheduleConfig())
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.1000"):
        SampleOptions(steps=0).check(sched.train_steps)
    with pytest.raises(ValueError, match="guidance must be in"):
        SampleOptions(guidance=-1).check(sched.train_steps)
    with pytest.raises(ValueError, match="unknown --spacing 'linspace'"):
        SampleOptions(spacing="linspace").check(sched.train_steps)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown timestep spacing"):
        sched.timesteps(50, "linspace")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown sampler"):
        SampleOptions(sampler="euler").check(sched.train_steps)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weights_against_diffusers_compute_snr(kind: str, prediction: str) -> None:
    """SNR from diffusers' training utility; the weights as its training scripts form them (gamma 5)."""
    from diffusers.training_utils import compute_snr

    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=KINDS[kind])
    ours = NoiseSchedule(_cfg(kind, prediction, True))
    t = torch.tensor([0, 1, 10, 200, 500, 900, 999])
    snr = compute_snr(ref, t)
    torch.testing.assert_close(ours.snr(t), snr, rtol=1e-4, atol=1e-6)
    clipped = torch.stack([snr, 5 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    want = clipped / snr if prediction == "epsilon" else clipped / (snr + 1)
    got = ours.loss_weights(t, 5.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if prediction == "epsilon":  # noisy steps (SNR < gamma) keep weight 1, clean ones are scaled down
        assert got[-1] == 1 and got[0] < 1e-3


def test_min_snr_loss_weights_each_sample() -> None:
    from chiasm.diffusion.train import diffusion_loss

    sched = NoiseSchedule(_cfg("linear", "epsilon", True))
    out, target = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([5, 400, 999])
    torch.testing.assert_close(diffusion_loss(out, target, sched, t, None), torch.nn.functional.mse_loss(out, target))
    per = (out - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(diffusion_loss(out, target, sched, t, 5.0), (sched.loss_weights(t, 5.0) * per).mean())
