"""The contrastive pre-alignment stage: its loss against a loop reference, and the stage in the trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from chiasm.config import BridgeConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import save_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.train.contrastive import caption_text, norm_penalty, token_contrastive_loss, with_phrases
from chiasm.train.trainer import Interrupted, Trainer

FROZEN = PolicyConfig(mode="frozen")


def _reference_loss(v, w, mask, tau):
    """The same FILIP loss written with explicit loops over pairs, tokens and words."""
    b = v.shape[0]
    w2i = torch.zeros(b, b)
    i2w = torch.zeros(b, b)
    for i in range(b):
        for j in range(b):
            words = [w[j, t] for t in range(w.shape[1]) if mask[j, t]]
            cos = torch.tensor([[float(F.cosine_similarity(v[i, n], x, dim=0)) for x in words]
                                for n in range(v.shape[1])])  # (N, L_j)
            w2i[i, j] = cos.max(0).values.mean()
            i2w[i, j] = cos.max(1).values.mean()
    target = torch.arange(b)
    terms = [F.cross_entropy(s / tau, target) for sim in (w2i, i2w) for s in (sim, sim.T)]
    return sum(terms) / 4, float((w2i.T.argmax(1) == target).float().mean())


def test_loss_matches_loop_reference() -> None:
    torch.manual_seed(0)
    v, w = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    loss, acc = token_contrastive_loss(v, w, mask, 0.1)
    ref_loss, ref_acc = _reference_loss(v, w, mask, 0.1)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert acc == ref_acc


def test_matching_tokens_score_better_than_shuffled_ones() -> None:
    torch.manual_seed(1)
    words = torch.randn(4, 6, 16)
    mask = torch.ones(4, 6, dtype=torch.bool)
    matched, acc = token_contrastive_loss(words.clone(), words, mask, 0.05)
    shuffled, _ = token_contrastive_loss(words[[1, 2, 3, 0]], words, mask, 0.05)
    assert acc == 1.0 and float(matched) < 0.01 < float(shuffled)


def test_padding_words_are_ignored() -> None:
    torch.manual_seed(2)
    v, w = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    w_noisy = w.clone()
    w_noisy[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    assert torch.equal(token_contrastive_loss(v, w, mask, 0.1)[0], token_contrastive_loss(v, w_noisy, mask, 0.1)[0])
    with pytest.raises(ValueError, match="at least one token"):
        token_contrastive_loss(v, w, torch.zeros(2, 4, dtype=torch.bool), 0.1)


def test_phrases_are_means_of_full_runs_of_real_tokens() -> None:
    torch.manual_seed(3)
    w = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    units, umask = with_phrases(w, mask, 3)
    assert units.shape == (2, 8, 4) and torch.equal(units[:, :5], w)
    for b in range(2):
        for start in range(3):
            real = bool(mask[b, start:start + 3].all())
            assert bool(umask[b, 5 + start]) == real
            if real:
                torch.testing.assert_close(units[b, 5 + start], w[b, start:start + 3].mean(0))
    assert with_phrases(w, mask, 1)[0] is w and with_phrases(w, mask, 9)[0] is w


def test_norm_penalty_is_zero_at_the_word_norm() -> None:
    v = F.normalize(torch.randn(2, 3, 8), dim=-1) * 3.0
    assert float(norm_penalty(v, 3.0)) == pytest.approx(0.0, abs=1e-10)
    assert float(norm_penalty(2 * v, 3.0)) == pytest.approx(math.log(2) ** 2, rel=1e-5)


def test_caption_text_joins_assistant_turns() -> None:
    s = Sample("s", [Turn("human", "<image>\nDescribe."), Turn("gpt", "A red circle."),
                     Turn("human", "More?"), Turn("gpt", " Top left. ")])
    assert caption_text(s) == "A red circle. Top left."


def _config(model_cfg, world, out, **kw) -> RunConfig:
    stage = StageConfig(name="prealign", data=str(world.align), encoder=FROZEN, lm=FROZEN, objective="contrastive",
                        batch_size=8, max_steps=12, lr=1e-2, temperature=0.1, **kw)
    return RunConfig(model=model_cfg, stages=[stage], output_dir=str(out), seed=1, precision="fp32")


def test_stage_trains_only_the_bridge_and_lowers_the_loss(tiny_model_config, tiny_world, tmp_path) -> None:
    trainer = Trainer(_config(tiny_model_config, tiny_world, tmp_path / "run"), show_progress=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    lm_calls = []
    trainer.model.lm.register_forward_pre_hook(lambda *a: lm_calls.append(1))
    model = trainer.run()
    assert not lm_calls  # the LM is never run, only its embedding table is read
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), before[name]) != name.startswith("bridge."), name
    recs = [json.loads(x) for x in (tmp_path / "run/stages/prealign/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert all(0.0 <= r["retrieval_acc"] <= 1.0 and r["images_per_s"] > 0 and "tokens_per_s" not in r for r in recs)
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first


def test_stage_resumes_exactly(tiny_model_config, tiny_world, tmp_path) -> None:
    straight = Trainer(_config(tiny_model_config, tiny_world, tmp_path / "a", checkpoint_every=1),
                       show_progress=False).run()
    cfg = _config(tiny_model_config, tiny_world, tmp_path / "b", checkpoint_every=1)
    with pytest.raises(Interrupted):
        Trainer(cfg, show_progress=False).run(stop_after_steps=5)
    resumed = Trainer(cfg, show_progress=False).run(resume=True)
    for k, v in straight.bridge.state_dict().items():
        assert torch.equal(v, resumed.bridge.state_dict()[k]), k


def test_stage_refuses_a_trainable_lm_and_in_lm_bridges(tiny_model_config, tiny_world, tmp_path) -> None:
    cfg = _config(tiny_model_config, tiny_world, tmp_path / "lora")
    cfg.stages[0].lm = PolicyConfig(mode="lora", lora_r=2)
    with pytest.raises(ValueError, match="needs the encoder and the LM frozen"):
        Trainer(cfg, show_progress=False).run()
    tiny_model_config.bridge = BridgeConfig(name="gated_xattn", options={"every": 1, "num_latents": 2, "heads": 2})
    with pytest.raises(ValueError, match="needs a prefix bridge"):
        Trainer(_config(tiny_model_config, tiny_world, tmp_path / "x"), show_progress=False).run()


def test_unpairable_samples_are_named_or_skipped(tiny_model_config, tiny_world, tmp_path, caplog) -> None:
    image = sorted((tiny_world.image_dir / "train").iterdir())[0]
    good = [Sample(f"ok-{i}", [Turn("human", "<image>\nDescribe."), Turn("gpt", "A red circle.")], [image])
            for i in range(8)]
    two = Sample("two-images", [Turn("human", "<image><image>\nCompare."), Turn("gpt", "Same.")], [image, image])
    data = tmp_path / "pairs.json"
    save_llava([*good, two], data, tmp_path)
    cfg = _config(tiny_model_config, tiny_world, tmp_path / "run")
    cfg.stages[0].data = str(data)
    cfg.stages[0].allow_outside_image_root = True  # the images stay in the world's folder
    with pytest.raises(DataError, match=r"two-images.*exactly one image"):
        Trainer(cfg, show_progress=False).run()
    cfg.stages[0].on_error = "skip"
    cfg.stages[0].max_skip_fraction = 0.2  # 1 of 9
    cfg.stages[0].max_steps = 1
    with caplog.at_level("WARNING"):
        Trainer(cfg, show_progress=False).run()
    assert "skipped 1 of 9 samples" in caplog.text and "two-images" in caplog.text
