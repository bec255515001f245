"""Speech training on a tiny random Whisper: each mode trains what it should, the loss falls,
a killed run resumes to the same weights, and the CLI's bad input is named before any loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from chiasm.speech.config import SpeechData, SpeechRunConfig, SpeechStage


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four short tone clips with German transcripts, as a JSONL manifest."""
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i, text in enumerate(["eins zwei", "drei vier", "fünf sechs", "sieben acht"]):
        t = np.arange(8000) / 16000
        sf.write(root / f"{i}.wav", 0.2 * np.sin(2 * np.pi * (200 + 150 * i) * t), 16000)
        rows.append({"audio": f"{i}.wav", "text": text, "language": "de"})
    (root / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "m.jsonl"


def _whisper():
    from chiasm.speech.tiny import tiny_whisper

    try:
        return tiny_whisper("base", d_model=32, layers=1, heads=2, seed=1)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


def _cfg(out: Path, manifest: Path, mode: str, steps: int = 6) -> SpeechRunConfig:
    return SpeechRunConfig(output_dir=str(out), model="tiny", train=[SpeechData("t", str(manifest))],
                           stages=[SpeechStage(name="ft", mode=mode, lr=3e-3, max_steps=steps, batch_size=2,
                                               warmup_ratio=0.0, checkpoint_every=2)], precision="fp32")


@pytest.mark.parametrize("mode", ["frozen_encoder", "lora", "full"])
def test_modes_train_what_they_say(tmp_path: Path, clips: Path, mode: str) -> None:
    from chiasm.speech.train import SpeechTrainer

    w = _whisper()
    before = {k: v.clone() for k, v in w.model.state_dict().items()}
    trainer = SpeechTrainer(_cfg(tmp_path, clips, mode), whisper=w, show_progress=False)
    out = trainer.run()
    after = out.model.state_dict()
    assert set(after) == set(before)  # LoRA merged away: a plain transformers model
    enc_changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.encoder."))
    dec_changed = any(not torch.equal(before[k], after[k]) for k in before if k.startswith("model.decoder.layers"))
    assert dec_changed and enc_changed == (mode == "full")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "stages/ft/metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0]
    folder = trainer.save(tmp_path / "model")
    from chiasm.speech.loader import load_whisper

    again = load_whisper(str(folder))
    assert torch.equal(again.model.state_dict()["model.decoder.layers.0.fc1.weight"],
                       after["model.decoder.layers.0.fc1.weight"])


def test_a_frozen_encoder_encodes_each_clip_once_and_trains_as_without_the_cache(
        tmp_path: Path, clips: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chiasm.speech.train as speech_train

    def run(out: Path) -> tuple[list[float], int]:
        w = _whisper()
        encoded: list[int] = []
        w.model.model.encoder.register_forward_hook(lambda _m, args, _o: encoded.append(args[0].shape[0]))
        speech_train.SpeechTrainer(_cfg(out, clips, "frozen_encoder"), whisper=w, show_progress=False).run()
        rows = (out / "stages/ft/metrics.jsonl").read_text().splitlines()
        return [json.loads(x)["loss"] for x in rows], sum(encoded)

    kept_losses, kept_clips = run(tmp_path / "kept")
    monkeypatch.setattr(speech_train, "TRAIN_CACHE_BYTES", 0)  # nothing kept: every step encodes its batch
    fresh_losses, fresh_clips = run(tmp_path / "fresh")
    assert kept_clips == 4 and fresh_clips == 6 * 2  # 4 clips once, against 6 steps of 2
    assert kept_losses == pytest.approx(fresh_losses, rel=1e-6)


def test_lora_targets_name_layers_by_their_last_parts() -> None:
    from chiasm.speech.policy import apply_mode

    stage = SpeechStage(name="ft", mode="lora", lora_r=2, lora_targets=["self_attn.k_proj", "fc1"])
    model = apply_mode(_whisper().model, stage)
    wrapped = {n.removesuffix(".lora_A.default") for n, _ in model.named_modules() if n.endswith(".lora_A.default")}
    short = {n.split("model.decoder.layers.0.")[-1] for n in wrapped}
    assert short == {"self_attn.k_proj", "fc1"}  # cross-attention's k_proj and the encoder left alone
    assert all(".decoder." in n for n in wrapped)
    with pytest.raises(ValueError, match="no linear layer named"):
        apply_mode(_whisper().model, SpeechStage(name="ft", mode="lora", lora_targets=["attn.k_proj"]))


def test_killed_run_resumes_to_the_same_weights(tmp_path: Path, clips: Path) -> None:
    from chiasm.speech.train import SpeechTrainer
    from chiasm.train.trainer import Interrupted

    whole = SpeechTrainer(_cfg(tmp_path / "a", clips, "full"), whisper=_whisper(), show_progress=False).run()
    first = SpeechTrainer(_cfg(tmp_path / "b", clips, "full"), whisper=_whisper(), show_progress=False)
    with pytest.raises(Interrupted):
        first.run(stop_after_steps=3)  # killed after step 3; the checkpoint is from step 2
    resumed = SpeechTrainer(_cfg(tmp_path / "b", clips, "full"), whisper=_whisper(), show_progress=False).run(
        resume=True)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    steps = [json.loads(x)["step"] for x in (tmp_path / "b/stages/ft/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_cli_names_a_bad_audio_file_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from chiasm.cli import main

    (tmp_path / "x.wav").write_bytes(b"garbage")
    assert main(["transcribe", str(tmp_path / "x.wav"), "--model", str(tmp_path / "no-such-model")]) == 2
    assert "x.wav: unreadable audio" in capsys.readouterr().err


def test_eval_cli_writes_table_and_report(tmp_path: Path, clips: Path, capsys: pytest.CaptureFixture) -> None:
    from chiasm.cli import main
    from chiasm.speech.loader import save_whisper

    folder = save_whisper(_whisper(), tmp_path / "tiny")
    out = tmp_path / "eval"
    assert main(["speech", "eval", "--model", str(folder), "--data", f"tones={clips}", "--beams", "1", "--beams", "2",
                 "--max-samples", "2", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "tones" in table and "greedy WER" in table and "beam2 WER" in table
    results = json.loads((out / "speech_eval.json").read_text())
    row = results["greedy"]["sets"][0]
    assert row["clips"] == 2 and row["words"] == 4 and row["wer"] is not None
    page = (out / "report.html").read_text()
    assert page.count("<audio") == 2 and "ref: eins zwei" in page
