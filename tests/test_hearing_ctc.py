"""The ctc pre-alignment stage: the audio bridge learns to emit the LM's word embeddings, in order."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn

from chiasm.config import AudioConfig, BridgeConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import save_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.hearing.ctc import CTCObjective, ctc_room, greedy_ctc, mask_frames
from chiasm.model import VisionLanguageModel
from chiasm.speech.loader import save_whisper
from chiasm.speech.tiny import tiny_whisper
from chiasm.train.trainer import Trainer

FROZEN, FULL = PolicyConfig(mode="frozen"), PolicyConfig(mode="full")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Whisper whose frames carry their sound: at random init its sinusoidal position
    embeddings swamp the conv front end (clips differ by ~1% of a frame), which no trained Whisper does."""
    w = tiny_whisper(d_model=16)
    with torch.no_grad():
        w.model.model.encoder.embed_positions.weight.mul_(0.05)
    return save_whisper(w, tmp_path_factory.mktemp("whisper") / "w")


@pytest.fixture
def ears(tiny_model_config, whisper_dir: Path) -> VisionLanguageModel:
    """The tiny VLM with a 1 s window and pooling [1, 2]: 25 audio tokens per clip (its tokenizer
    splits a word into several tokens, each needing an audio token of its own)."""
    torch.manual_seed(0)
    cfg = replace(tiny_model_config, audio=AudioConfig(source=str(whisper_dir), seconds=1.0,
                                                       bridge=BridgeConfig("pooling", {"kernel": [1, 2]})))
    return VisionLanguageModel.build(cfg)


def _tone(path: Path, *freqs: float, seconds: float = 0.4) -> Path:
    """One tone of ``seconds`` per frequency, in order: a stand-in for one spoken word each."""
    t = np.arange(int(16_000 * seconds)) / 16_000
    sf.write(path, np.concatenate([0.3 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32), 16_000)
    return path


def _spoken(clip: Path, text: str, sid: str) -> Sample:
    return Sample(sid, [Turn("human", "<audio>\nWrite down what was said."), Turn("gpt", text)], audios=[clip])


def _stage(data: Path, **kw) -> StageConfig:
    options = dict(name="hear", data=str(data), image_root=str(data.parent), encoder=FROZEN, bridge=FROZEN,
                   lm=FROZEN, audio_bridge=FULL, objective="ctc", temperature=0.1, batch_size=4, max_steps=2,
                   lr=1e-2, allow_outside_image_root=True)
    return StageConfig(**{**options, **kw})


def test_greedy_decoding_merges_repeats_then_drops_blanks() -> None:
    assert greedy_ctc([0, 3, 3, 0, 3, 5, 5, 0]) == [3, 3, 5]
    assert greedy_ctc([0, 0, 0]) == []
    assert ctc_room([7, 7, 8]) == 4 and ctc_room([1, 2, 3]) == 3  # a repeat needs a blank between


def test_time_masks_zero_whole_spans_and_repeat_with_the_seed() -> None:
    frames = torch.ones(3, 50, 8)
    masked = mask_frames(frames, torch.Generator().manual_seed(1), spans=2, width=10, drop=0.0)
    zero_frames = (masked == 0).all(-1)
    assert masked.shape == frames.shape and bool(zero_frames.any()) and int(zero_frames.sum(1).max()) <= 20
    assert torch.equal(masked, mask_frames(frames, torch.Generator().manual_seed(1), spans=2, width=10, drop=0.0))
    dropped = mask_frames(frames, torch.Generator().manual_seed(2), spans=0, drop=0.5)
    assert 0.3 < float((dropped == 0).float().mean()) < 0.7 and float(dropped.max()) == 2.0  # rescaled by 1/(1-p)


def test_a_word_embedding_fed_as_an_audio_token_is_scored_as_that_word(ears, tmp_path) -> None:
    """The class scores are cosines with the LM's own input embeddings; blank is class 0."""
    samples = [_spoken(_tone(tmp_path / f"{i}.wav", 300 + 200 * i), text, f"s{i}")
               for i, text in enumerate(["red circle", "blue square"])]
    obj = CTCObjective(ears, samples, _stage(tmp_path / "d.json"))
    table = ears.lm.get_input_embeddings().weight.detach()
    assert obj.vocab.tolist() == sorted({i for s in samples for i in ears.tokenizer(
        s.conversations[1].text, add_special_tokens=False).input_ids})
    tokens = torch.stack([3.0 * table[obj.vocab], 0.5 * obj.blank.expand(len(obj.vocab), -1)])  # (2, V, D)
    best = obj.logits(tokens).argmax(-1)
    assert best[0].tolist() == list(range(1, len(obj.vocab) + 1)) and set(best[1].tolist()) == {0}
    expected = F.cosine_similarity(tokens[0, :1], table[obj.vocab[:1]], dim=-1) / 0.1
    assert torch.allclose(obj.logits(tokens)[0, 0, 1], expected[0], atol=1e-5)


def test_a_ctc_stage_trains_the_audio_bridge_alone_through_the_trainer(ears, tmp_path) -> None:
    pitch = {"no": 300, "the": 600, "is": 1000, "top": 1600}
    samples = [_spoken(_tone(tmp_path / f"c{i}.wav", *(pitch[w] for w in text.split())), text, f"s{i}")
               for i, text in enumerate(["no", "the is", "is the", "top"])]
    save_llava(samples, tmp_path / "d.json", tmp_path)
    cfg = RunConfig(model=ears.config, stages=[_stage(tmp_path / "d.json", max_steps=60)],
                    output_dir=str(tmp_path / "run"), precision="fp32")
    before = {n: p.detach().clone() for n, p in ears.named_parameters()}
    Trainer(cfg, model=ears, show_progress=False).run()
    for name, p in ears.named_parameters():
        assert (not torch.equal(p.detach(), before[name])) == name.startswith("audio_bridge."), name
    rows = [json.loads(line) for line in (tmp_path / "run/stages/hear/metrics.jsonl").open()]
    assert rows[-1]["loss"] < 0.1 * rows[0]["loss"] and "exact" in rows[-1]


def test_tokens_that_are_their_words_embeddings_cost_nothing_and_twice_their_norm_does(ears, tmp_path) -> None:
    """The pull term: a token is drawn to the embedding its posterior expects, norm included."""
    obj = CTCObjective(ears, [_spoken(_tone(tmp_path / "c.wav", 440), "the is", "s")], _stage(tmp_path / "d.json"))
    table = ears.lm.get_input_embeddings().weight.detach()
    tokens = obj.blank.repeat(ears.tokens_per_audio, 1)
    tokens[3], tokens[7] = table[obj.labels[0][0]], table[obj.labels[0][1]]

    class Says(nn.Module):  # a "bridge" that emits the given tokens whatever it hears
        def __init__(self, tokens: torch.Tensor) -> None:
            super().__init__()
            self.tokens = nn.Parameter(tokens.clone())

        def forward(self, frames: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
            return self.tokens.expand(frames.shape[0], -1, -1)

    exact = Says(tokens).eval()
    loss, decoded = obj.loss([0], exact, None)
    assert decoded == 1.0 and float(loss.detach()) < 0.05
    loud, decoded_loud = obj.loss([0], Says(2 * tokens).eval(), None)
    # same cosines, twice the norm: pulled back
    assert decoded_loud == 1.0 and float(loud.detach()) > float(loss.detach()) + 0.5

def test_masks_come_from_torchs_generator_so_a_resumed_stage_repeats_them(ears, tmp_path) -> None:
    samples = [_spoken(_tone(tmp_path / f"{i}.wav", 300 + 200 * i), t, f"s{i}") for i, t in enumerate(["red", "blue"])]
    obj = CTCObjective(ears, samples, _stage(tmp_path / "d.json"))
    bridge = ears.audio_bridge.train()
    losses = []
    for _ in range(2):
        torch.manual_seed(5)  # what resuming from a checkpoint restores
        losses.append(obj.loss([1, 0], bridge, None)[0])
    assert torch.equal(*losses) and not torch.equal(losses[0], obj.loss([1, 0], bridge, None)[0])
    bridge.eval()  # no masks outside training
    assert torch.equal(obj.loss([1, 0], bridge, None)[0], obj.loss([1, 0], bridge, None)[0])

def test_bad_samples_and_stages_are_refused_by_name(ears, tiny_model, image, tmp_path) -> None:
    clip = _tone(tmp_path / "c.wav", 440)
    stage = _stage(tmp_path / "d.json")
    with pytest.raises(DataError, match=r"needs \d+ audio tokens for CTC; a clip has 25"):
        CTCObjective(ears, [_spoken(clip, " ".join(["red blue green yellow"] * 4), "x")], stage)
    with pytest.raises(DataError, match="one audio clip, no image"):
        CTCObjective(ears, [Sample("y", [Turn("human", "<image>\n<audio>"), Turn("gpt", "red")], [image],
                                   audios=[clip])], stage)
    with pytest.raises(DataError, match="empty transcript"):
        CTCObjective(ears, [_spoken(clip, " ", "z")], stage)
    kept = CTCObjective(ears, [_spoken(clip, "red", "a"), _spoken(clip, "", "b")],
                        replace(stage, on_error="skip", max_skip_fraction=0.5))
    assert len(kept) == 1 and kept.skipped[0][0] == "b"
    with pytest.raises(ValueError, match=r"audio bridge alone.*lm 'lora'"):
        CTCObjective(ears, [_spoken(clip, "red", "a")], replace(stage, lm=PolicyConfig(mode="lora")))
    with pytest.raises(ValueError, match=r"a model that hears"):
        CTCObjective(tiny_model, [_spoken(clip, "red", "a")], stage)
