"""The CTranslate2 reader and converter: exact round trip through CTranslate2's own converter,
and the real packaged tiny.en against CTranslate2 on a real recording."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chiasm.errors import ModelFolderError
from chiasm.speech.ct2_format import read_ct2_model
from chiasm.speech.ct2_to_hf import convert_ct2_folder

ct2 = pytest.importorskip("ctranslate2")


def _packaged_or_skip(name: str) -> Path:
    from chiasm.speech.loader import packaged_ct2_folder

    try:
        return packaged_ct2_folder(name)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tiny_ct2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A random tiny Whisper written by CTranslate2's converter (float32), and the original."""
    from chiasm.speech.tiny import tiny_whisper

    _packaged_or_skip("tiny.en")
    w = tiny_whisper("tiny.en", d_model=64, layers=2, heads=4, seed=3)
    with torch.no_grad():  # non-zero biases everywhere: a mixed-up bias slot must show
        for p in w.model.parameters():
            if p.ndim == 1:
                p.normal_(0, 0.1)
    src = tmp_path_factory.mktemp("hf-tiny")
    w.model.save_pretrained(src)
    w.tokenizer.save_pretrained(src)
    w.features.save_pretrained(src)
    out = tmp_path_factory.mktemp("ct2") / "model"
    converter = ct2.converters.TransformersConverter(str(src), copy_files=["tokenizer.json"])
    converter.convert(str(out), quantization="float32")
    return out, w


def test_roundtrip_weights_are_exact(tiny_ct2: tuple[Path, object]) -> None:
    folder, w = tiny_ct2
    model, tok, _ = convert_ct2_folder(folder)
    ours, theirs = model.state_dict(), w.model.state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        if k.endswith("k_proj.bias"):
            continue  # Whisper's K has no bias; transformers keeps none
        assert torch.equal(ours[k], v), k
    assert tok.convert_tokens_to_ids("<|notimestamps|>") == w.tokenizer.convert_tokens_to_ids("<|notimestamps|>")


def test_roundtrip_matches_ctranslate2_outputs(tiny_ct2: tuple[Path, object]) -> None:
    folder, _ = tiny_ct2
    model, tok, fe = convert_ct2_folder(folder)
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    feats = fe(audio, sampling_rate=16000, return_tensors="pt").input_features
    ref = ct2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    theirs = np.array(ref.encode(ct2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))))
    with torch.no_grad():
        ours = model.model.encoder(feats).last_hidden_state.numpy()
    assert np.abs(ours - theirs).max() < 1e-4
    prompt = [tok.convert_tokens_to_ids("<|startoftranscript|>"), tok.convert_tokens_to_ids("<|notimestamps|>")]
    ct2_ids = ref.generate(ct2.StorageView.from_array(np.ascontiguousarray(feats.numpy())), [prompt], beam_size=1,
                           max_length=12, suppress_blank=False, suppress_tokens=[], return_no_speech_prob=False)
    with torch.no_grad():
        logits = model(input_features=feats, decoder_input_ids=torch.tensor([prompt])).logits[0, -1]
    assert int(logits.argmax()) == ct2_ids[0].sequences_ids[0][0]


def test_reader_refuses_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x63\x00\x00\x00garbage")
    with pytest.raises(ModelFolderError, match="binary version 99"):
        read_ct2_model(bad)
    bad.write_bytes(b"\x06\x00\x00\x00\x0c\x00WhisperSp")
    with pytest.raises(ModelFolderError, match="truncated"):
        read_ct2_model(bad)
    with pytest.raises(ModelFolderError, match=r"no CTranslate2 model\.bin"):
        read_ct2_model(tmp_path / "nothing")


@pytest.mark.real
def test_packaged_tiny_en_matches_ctranslate2_on_a_recording() -> None:
    """Real weights, real speech: encoder within 1e-3 of CTranslate2, greedy tokens identical."""
    from chiasm.speech.audio import load_audio
    from chiasm.speech.datasets import POCKETSPHINX

    wav = POCKETSPHINX / "librivox" / "sense_and_sensibility_01_austen_64kb-0880.wav"
    if not wav.is_file():
        pytest.skip("pocketsphinx-testdata not installed")
    folder = _packaged_or_skip("tiny.en")
    model, tok, fe = convert_ct2_folder(folder)
    feats = fe(load_audio(wav), sampling_rate=16000, return_tensors="pt").input_features
    ref = ct2.models.Whisper(str(folder), device="cpu", compute_type="float32")
    view = ct2.StorageView.from_array(np.ascontiguousarray(feats.numpy()))
    with torch.no_grad():
        ours = model.model.encoder(feats).last_hidden_state.numpy()
    assert np.abs(ours - np.array(ref.encode(view))).max() < 1e-3
    prompt = [tok.convert_tokens_to_ids("<|startoftranscript|>"), tok.convert_tokens_to_ids("<|notimestamps|>")]
    theirs = ref.generate(view, [prompt], beam_size=1, max_length=60)[0].sequences_ids[0]
    with torch.no_grad():
        mine = model.generate(feats, decoder_input_ids=torch.tensor([prompt]), max_new_tokens=40)[0].tolist()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    mine = [t for t in mine if t < eot]
    assert mine == [t for t in theirs if t < eot]
    assert "young man" in tok.decode(mine)
