"""Self-replay: sampling the LM's own text, its loss, and the stage option."""

from __future__ import annotations

import json

import pytest
import torch

from chiasm.config import PolicyConfig, RunConfig, StageConfig
from chiasm.lm.loader import load_language_model
from chiasm.train.replay import replay_loss, sample_text
from chiasm.train.trainer import Trainer


def test_samples_are_seeded_start_at_bos_and_leave_the_global_rng_alone(tiny_lm_dir) -> None:
    lm, tok = load_language_model(str(tiny_lm_dir))
    state = torch.get_rng_state()
    a = sample_text(lm, tok, 5, 7, seed=1, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (5, 7) and torch.equal(a, sample_text(lm, tok, 5, 7, seed=1, batch_size=2))
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert bool((a[:, 0] == start).all())
    assert not torch.equal(a, sample_text(lm, tok, 5, 7, seed=2, batch_size=2))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sample_text(lm, tok, 1, 1, seed=0)


def test_replay_loss_is_the_lm_loss_on_every_token(tiny_lm_dir) -> None:
    lm, _ = load_language_model(str(tiny_lm_dir))
    ids = torch.randint(0, lm.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(replay_loss(lm, ids), lm(input_ids=ids, labels=ids).loss)


def _config(model_cfg, world, out, lm: PolicyConfig, **kw) -> RunConfig:
    stage = StageConfig(name="instruct", data=str(world.instruct), encoder=PolicyConfig(mode="frozen"), lm=lm,
                        batch_size=4, max_steps=3, lr=1e-2, text_replay=2, replay_tokens=10, **kw)
    return RunConfig(model=model_cfg, stages=[stage], output_dir=str(out), seed=0, precision="fp32")


def test_stage_logs_replay_loss_and_refuses_a_frozen_lm(tiny_model_config, tiny_world, tmp_path) -> None:
    cfg = _config(tiny_model_config, tiny_world, tmp_path / "run", PolicyConfig(mode="lora", lora_r=2))
    Trainer(cfg, show_progress=False).run()
    recs = [json.loads(x) for x in (tmp_path / "run/stages/instruct/metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["replay_loss"] > 0 for r in recs)
    # The logged loss is the data's alone: step 1 (before any update) matches a run without replay.
    plain = _config(tiny_model_config, tiny_world, tmp_path / "plain", PolicyConfig(mode="lora", lora_r=2))
    plain.stages[0].text_replay = 0
    Trainer(plain, show_progress=False).run()
    first = json.loads((tmp_path / "plain/stages/instruct/metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(recs[0]["loss"], rel=1e-6) and "replay_loss" not in first
    frozen = _config(tiny_model_config, tiny_world, tmp_path / "frozen", PolicyConfig(mode="frozen"))
    with pytest.raises(ValueError, match="text_replay keeps a trained LM's language"):
        Trainer(frozen, show_progress=False).run()
