"""Audio through the encoder seam: a Whisper encoder + bridge whose tokens fill <audio> positions."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chiasm.config import AudioConfig, BridgeConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import load_llava, save_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.hearing.encoder import AudioEncoder, window_frames
from chiasm.model import VisionLanguageModel
from chiasm.speech.loader import save_whisper
from chiasm.speech.tiny import tiny_whisper
from chiasm.train.grouping import estimate_lengths
from chiasm.train.trainer import Trainer

SECONDS = 1.0  # 50 encoder frames; pooling [1, 10] -> 5 tokens per clip


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Whisper saved as a transformers folder (the loading path of any local Whisper)."""
    return save_whisper(tiny_whisper(d_model=16), tmp_path_factory.mktemp("whisper") / "w")


@pytest.fixture
def hearing_model(tiny_model_config, whisper_dir: Path) -> VisionLanguageModel:
    torch.manual_seed(0)
    cfg = replace(tiny_model_config, audio=AudioConfig(source=str(whisper_dir), seconds=SECONDS,
                                                       bridge=BridgeConfig("pooling", {"kernel": [1, 10]})))
    return VisionLanguageModel.build(cfg)


def _wav(path: Path, seconds: float, freq: float = 440.0) -> Path:
    t = np.arange(int(16_000 * seconds)) / 16_000
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16_000)
    return path


def _sample(image: Path, clip: Path, sid: str = "s", answer: str = "red") -> Sample:
    return Sample(sid, [Turn("human", "<image>\n<audio>"), Turn("gpt", answer)], [image], audios=[clip])


def test_audio_positions_hold_the_bridge_tokens_of_each_clip(hearing_model, image, tmp_path) -> None:
    m = hearing_model
    assert m.tokens_per_audio == 5 and m.audio_encoder.grid() == (1, 50)
    clip = _wav(tmp_path / "a.wav", 0.6)
    batch = m.processor([_sample(image, clip)])
    assert batch.audio.shape == (1, 80, 100)  # 1 s of log-mel at 100 frames per second
    ids = batch.input_ids
    assert int((ids == m.audio_token_id).sum()) == 5 and int((ids == m.image_token_id).sum()) == m.tokens_per_image
    embeds = m.embed(ids, m.encode_images(batch.pixels), batch.audio)
    expected = m.audio_tokens(batch.audio)[0]
    assert torch.allclose(embeds[ids == m.audio_token_id], expected)
    # The clip's frames come from the Whisper encoder cut to the window: the same as the full
    # encoder's first 50 frames when its input holds the same mel frames (padding differs after).
    assert m.audio_encoder.encoder.embed_positions.weight.shape[0] == 50


def test_loss_trains_the_audio_bridge_and_never_the_whisper_encoder(hearing_model, image, tmp_path) -> None:
    m = hearing_model
    batch = m.processor([_sample(image, _wav(tmp_path / "a.wav", 0.5))])
    out = m(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels, audio=batch.audio)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.audio_bridge.parameters())
    assert all(not p.requires_grad and p.grad is None for p in m.audio_encoder.parameters())


def test_the_answer_depends_on_the_clip(hearing_model, image, tmp_path) -> None:
    m = hearing_model.eval()
    low, high = _wav(tmp_path / "low.wav", 0.5, 200.0), _wav(tmp_path / "high.wav", 0.5, 3000.0)
    logits = []
    for clip in (low, high):
        b = m.processor([_sample(image, clip)])
        logits.append(m(b.input_ids, b.attention_mask, pixels=b.pixels, audio=b.audio, return_logits=True).logits)
    assert not torch.allclose(logits[0], logits[1])


def test_save_and_load_keep_what_the_model_hears(hearing_model, image, tmp_path) -> None:
    m = hearing_model.eval()
    folder = m.save(tmp_path / "model")
    assert (folder / "audio" / "config.json").is_file() and (folder / "audio_bridge.safetensors").is_file()
    back = VisionLanguageModel.load(folder)
    assert back.tokens_per_audio == 5 and back.processor.audio.seconds == SECONDS
    b = m.processor([_sample(image, _wav(tmp_path / "a.wav", 0.7))])
    b2 = back.processor([_sample(image, _wav(tmp_path / "a.wav", 0.7))])
    assert torch.equal(b.input_ids, b2.input_ids) and torch.allclose(b.audio, b2.audio)
    kw = {"pixels": b.pixels, "audio": b.audio, "return_logits": True}
    assert torch.allclose(m(b.input_ids, b.attention_mask, **kw).logits,
                          back(b.input_ids, b.attention_mask, **kw).logits, atol=1e-5)
    prompt = back.processor([_sample(image, _wav(tmp_path / "a.wav", 0.7))], for_generation=True)
    rows = back.generate(prompt.input_ids, prompt.attention_mask, pixels=prompt.pixels, audio=prompt.audio,
                         max_new_tokens=3)
    assert back.audio_token_id not in rows[0]


def test_bad_audio_is_named_and_never_cut(hearing_model, image, tmp_path) -> None:
    p = hearing_model.processor
    with pytest.raises(DataError, match=r"long\.wav: 1\.50 s of audio; this model hears at most 1 s"):
        p([_sample(image, _wav(tmp_path / "long.wav", 1.5))])
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(DataError, match=r"sample 's'.*broken\.wav: unreadable audio"):
        p([_sample(image, broken)])
    clip = _wav(tmp_path / "a.wav", 0.5)
    two = Sample("two", [Turn("human", "<image>\n<audio> <audio>"), Turn("gpt", "x")], [image], audios=[clip])
    with pytest.raises(DataError, match=r"2 <audio> placeholder.* but 1 audio clip"):
        p([two])


def test_length_grouping_counts_each_clip_as_its_audio_tokens(hearing_model, image, tmp_path) -> None:
    m = hearing_model
    clip = _wav(tmp_path / "a.wav", 0.5)
    samples = [Sample("one", [Turn("human", "<image>\n<audio>"), Turn("gpt", "red")], [image], audios=[clip]),
               Sample("three", [Turn("human", "<image>\n<audio> <audio>\n<audio>"), Turn("gpt", "red")], [image],
                      audios=[clip] * 3),
               Sample("none", [Turn("human", "<image>\nWhat colour is it?"), Turn("gpt", "red")], [image])]
    est = estimate_lengths(samples, m.tokenizer, m.tokens_per_image, tokens_per_audio=m.processor.conversation
                           .tokens_per_audio)
    real = [len(m.processor.conversation.encode(s).input_ids) for s in samples]
    # The chat template's tokens are the same for every sample: the estimate is off by one constant.
    assert len({r - e for r, e in zip(real, est, strict=True)}) == 1
    assert est[1] - est[0] >= 2 * m.tokens_per_audio


def test_a_model_that_does_not_hear_refuses_audio(tiny_model, image, tmp_path) -> None:
    with pytest.raises(DataError, match="this model does not hear"):
        tiny_model.processor([_sample(image, _wav(tmp_path / "a.wav", 0.5))])
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="does not hear"):
        tiny_model.embed(ids, None, torch.zeros(1, 80, 100))


def test_window_must_fit_the_encoder_positions(whisper_dir) -> None:
    assert window_frames(4.0, 1500) == 200
    for bad in (0.0, 0.013, 31.0):
        with pytest.raises(ValueError, match=r"multiple of 0.02 s"):
            window_frames(bad, 1500)
    enc = AudioEncoder.from_whisper(str(whisper_dir), 2.0)
    assert enc.encoder(torch.zeros(1, 80, 200)).last_hidden_state.shape == (1, 100, 16)


def test_llava_records_carry_audio_both_ways(image, tmp_path) -> None:
    clip = _wav(tmp_path / "q.wav", 0.5)
    root = image.parent
    path = tmp_path / "data.json"
    (root / "q.wav").write_bytes(clip.read_bytes())
    save_llava([_sample(image, root / "q.wav")], path, root)
    back = load_llava(path, image_root=root).samples[0]
    assert back.audios == [root / "q.wav"] and back.images == [image]
    path.write_text(path.read_text().replace('"q.wav"', '"missing.wav"'))
    assert "audio not found" in load_llava(path, image_root=root, on_error="skip").skipped[0][1]


def test_a_stage_trains_the_audio_bridge_through_the_trainer(hearing_model, image, tmp_path) -> None:
    clips = [_wav(tmp_path / f"c{i}.wav", 0.4, 300.0 * (i + 1)) for i in range(4)]
    samples = [_sample(image, c, f"s{i}", ["red", "blue"][i % 2]) for i, c in enumerate(clips)]
    save_llava(samples, tmp_path / "d.json", tmp_path)
    frozen = PolicyConfig(mode="frozen")
    stage = StageConfig(name="hear", data=str(tmp_path / "d.json"), image_root=str(tmp_path), encoder=frozen,
                        bridge=frozen, lm=frozen, batch_size=2, max_steps=2, lr=1e-2, feature_cache=False,
                        allow_outside_image_root=True)
    cfg = RunConfig(model=hearing_model.config, stages=[stage], output_dir=str(tmp_path / "run"), precision="fp32")
    before = {n: p.detach().clone() for n, p in hearing_model.named_parameters()}
    trainer = Trainer(cfg, model=hearing_model, show_progress=False)
    trainer.run()
    counts = trainer.stage_counts["hear"]
    assert counts["audio_bridge"]["trainable"] > 0 and counts["bridge"]["trainable"] == 0
    for name, p in hearing_model.named_parameters():
        assert (not torch.equal(p.detach(), before[name])) == name.startswith("audio_bridge."), name


def test_audio_config_is_checked_before_anything_loads(tiny_model_config) -> None:
    from chiasm.config import ConfigError
    from chiasm.config_checks import value_problems
    from chiasm.options import check_model_options

    bad = replace(tiny_model_config, audio=AudioConfig(seconds=0.013, bridge=BridgeConfig("pooling", {"kernal": 2})))
    assert any("audio.seconds: must be a multiple of 0.02" in p for p in value_problems(bad))
    with pytest.raises(ConfigError, match=r"audio bridge 'pooling'.*unknown option.*kernal"):
        check_model_options(bad)


def test_init_from_a_saved_model_with_audio_added_gives_it_ears(tiny_model, whisper_dir, tmp_path) -> None:
    from chiasm.config import ModelConfig
    from chiasm.train.init_from import resolve_init_from, start_model

    folder = tiny_model.save(tmp_path / "seeing")
    ears = AudioConfig(source=str(whisper_dir), seconds=SECONDS, bridge=BridgeConfig("pooling", {"kernel": [1, 10]}))
    cfg = RunConfig(model=ModelConfig(audio=ears), init_from=str(folder), output_dir=str(tmp_path / "run"))
    resolve_init_from(cfg)
    assert cfg.model.audio == ears and cfg.model.encoder == tiny_model.config.encoder
    model = start_model(cfg)
    assert model.tokens_per_audio == 5
    for name, p in tiny_model.state_dict().items():  # the seeing parts are the saved ones
        assert torch.equal(model.state_dict()[name], p), name


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng (scripts/setup.sh)")
def test_spoken_vqa_benchmark_runs_end_to_end(tiny_model, tiny_world, whisper_dir, tmp_path, capsys) -> None:
    """The benchmark's whole path on tiny parts: speak, give ears, train two stages, answer typed and spoken."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import spoken_vqa

    vision = tiny_model.save(tmp_path / "vision")
    code = spoken_vqa.main(["--vision", str(vision), "--world", str(tiny_world.root), "--whisper", str(whisper_dir),
                            "--work", str(tmp_path / "work"), "--quick", "--batch", "2"])
    assert code == 0
    assert "typed" in capsys.readouterr().out
    spoken = load_llava(tmp_path / "work" / "spoken_eval.json", allow_outside_root=True).samples
    assert len(spoken) == len(load_llava(tiny_world.eval).samples) and all(len(s.audios) == 1 for s in spoken)
    assert (tmp_path / "work" / "run" / "stages" / "answer" / "metrics.jsonl").is_file()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs Debian's espeak-ng (scripts/setup.sh)")
def test_spoken_vqa_benchmark_with_a_ctc_hear_stage(tiny_model, tiny_world, whisper_dir, tmp_path) -> None:
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import spoken_vqa

    vision = tiny_model.save(tmp_path / "vision")
    code = spoken_vqa.main(["--vision", str(vision), "--world", str(tiny_world.root), "--whisper", str(whisper_dir),
                            "--work", str(tmp_path / "work"), "--quick", "--batch", "2", "--hear", "ctc",
                            "--ctc-batch", "4", "--kernel", "5", "--voices", "7"])
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "work/run/stages/hear/metrics.jsonl").open()]
    assert len(rows) == 2 and all("exact" in r for r in rows)  # the ctc objective's metric, no LM pass


def test_chat_cli_asks_a_spoken_question(hearing_model, image, tmp_path, capsys) -> None:
    from chiasm.chat import ask
    from chiasm.cli import main

    folder = hearing_model.save(tmp_path / "model")
    clip = _wav(tmp_path / "q.wav", 0.5)
    assert main(["chat", str(folder), "--image", str(image), "--audio", str(clip), "--max-new-tokens", "4"]) == 0
    said = capsys.readouterr().out.strip()
    assert said == ask(VisionLanguageModel.load(folder), "", [image], audios=[clip], max_new_tokens=4)
    assert main(["chat", str(folder), "--audio", str(tmp_path / "missing.wav"), "Hello?"]) == 2
    assert "missing.wav: audio file not found" in capsys.readouterr().err


def test_ddp_two_ranks_with_and_without_audio_match_one_process(hearing_model, image, tmp_path) -> None:
    """2 gloo ranks x batch 2 == one process with batch 2 x 2 accumulation, on a mix of samples with
    and without a clip (batches without one leave the audio bridge without a gradient)."""
    from safetensors.torch import load_file

    from chiasm.config import save_config
    from chiasm.testing import run_ranks

    samples = []
    for i in range(8):
        clip = [_wav(tmp_path / f"c{i}.wav", 0.3 + 0.05 * i, 250.0 * (i + 1))] if i % 2 == 0 else []
        text = "<image>\n<audio>" if clip else "<image>\nWhat colour?"
        samples.append(Sample(f"s{i}", [Turn("human", text), Turn("gpt", ["red", "blue"][i % 3 == 0])], [image],
                              audios=clip))
    save_llava(samples, tmp_path / "d.json", tmp_path)
    frozen = PolicyConfig(mode="frozen")

    def config(out: str, **kw) -> RunConfig:
        stage = StageConfig(name="hear", data=str(tmp_path / "d.json"), image_root=str(tmp_path), encoder=frozen,
                            lm=frozen, batch_size=2, max_steps=2, lr=1e-2, feature_cache=False,
                            allow_outside_image_root=True, **kw)
        return RunConfig(model=hearing_model.config, stages=[stage], output_dir=str(tmp_path / out),
                         precision="fp32", seed=1)

    save_config(config("ddp"), tmp_path / "ddp.json")
    run_ranks(["-m", "chiasm.cli", "train", "--config", str(tmp_path / "ddp.json"), "--no-eval"], timeout=280)
    torch.manual_seed(0)
    single = Trainer(config("single", grad_accum=2), show_progress=False).run()
    ddp = load_file(str(tmp_path / "ddp" / "model" / "audio_bridge.safetensors"))
    for k, v in single.audio_bridge.state_dict().items():
        torch.testing.assert_close(ddp[k], v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("family", "chat"), [("qwen2", "chatml"), ("gemma2", "gemma"), ("phi3", "phi3"),
                                              ("gpt_neox", "chatml")])
def test_audio_reaches_lms_of_other_families(family: str, chat: str, tiny_model_config, whisper_dir: Path,
                                             image: Path, tmp_path: Path) -> None:
    """Not only Llama: Gemma scales its input embeddings, Phi-3 fuses qkv, GPT-NeoX names its layers its own way."""
    from chiasm.chat_template import stop_token_ids
    from chiasm.config import LMConfig
    from chiasm.testing import make_tiny_lm

    torch.manual_seed(0)
    lm = make_tiny_lm(tmp_path / family, family=family, chat=chat)
    cfg = replace(tiny_model_config, lm=LMConfig(source=str(lm)),
                  audio=AudioConfig(source=str(whisper_dir), seconds=SECONDS,
                                    bridge=BridgeConfig("pooling", {"kernel": [1, 10]})))
    m = VisionLanguageModel.build(cfg).eval()
    assert m.base_lm.config.model_type == family
    low, high = _wav(tmp_path / "low.wav", 0.5, 200.0), _wav(tmp_path / "high.wav", 0.5, 3000.0)
    batch = m.processor([_sample(image, low), _sample(image, high, "s2")])
    ids = batch.input_ids
    assert int((ids == m.audio_token_id).sum()) == 2 * m.tokens_per_audio
    embeds = m.embed(ids, m.encode_images(batch.pixels), batch.audio)
    assert torch.allclose(embeds[ids == m.audio_token_id], m.audio_tokens(batch.audio).flatten(0, 1))
    with torch.no_grad():
        split = m(ids, batch.attention_mask, batch.labels, pixels=batch.pixels, audio=batch.audio)
        full = m(ids, batch.attention_mask, batch.labels, pixels=batch.pixels, audio=batch.audio, return_logits=True)
    assert torch.isfinite(split.loss) and torch.allclose(split.loss, full.loss, atol=1e-5)
    assert not torch.allclose(full.logits[0, -3], full.logits[1, -3])  # same image and text, other clip

    # Greedy generation with the KV cache equals a full forward pass per token, with the clip in the prompt.
    prompt = m.processor([_sample(image, high)], for_generation=True)
    generated = m.generate(prompt.input_ids, prompt.attention_mask, pixels=prompt.pixels, audio=prompt.audio,
                           max_new_tokens=3)
    p_ids, p_mask, stop, reference = prompt.input_ids, prompt.attention_mask, stop_token_ids(m.base_lm, m.tokenizer), []
    with torch.no_grad():
        for _ in range(3):
            token = int(m(p_ids, p_mask, pixels=prompt.pixels, audio=prompt.audio, return_logits=True).logits[0, -1]
                        .argmax())
            if token in stop:
                break
            reference.append(token)
            p_ids = torch.cat([p_ids, p_ids.new_tensor([[token]])], 1)
            p_mask = torch.cat([p_mask, p_mask.new_ones(1, 1)], 1)
    assert generated == [reference]
