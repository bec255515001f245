"""The processor: one sample -> inputs path, saved with the model and usable without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from chiasm.conversation import IGNORE_INDEX
from chiasm.data.images import load_image
from chiasm.data.llava import load_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.features import FeatureCache
from chiasm.model import VisionLanguageModel
from chiasm.processor import PROCESSOR_FILE, Processor
from chiasm.synthetic.world import WorldFiles
from chiasm.train import batches


def _samples(world: WorldFiles, n: int = 3) -> list[Sample]:
    return load_llava(world.instruct).samples[:n]


def test_processor_batch_is_the_training_batch(tiny_model: VisionLanguageModel, tiny_world: WorldFiles) -> None:
    samples = _samples(tiny_world)
    batch = tiny_model.processor(samples)
    prepared, _ = batches.prepare(samples, tiny_model)
    old = batches.collate(prepared, tiny_model.tokenizer.pad_token_id, model=tiny_model)
    for name in ("input_ids", "attention_mask", "labels", "pixels"):
        assert torch.equal(getattr(batch, name), getattr(old, name)), name
    # Rows: right-padded, image placeholders expanded to tokens_per_image, labels only on answers.
    n = tiny_model.tokens_per_image
    for r, s in enumerate(samples):
        assert int((batch.input_ids[r] == tiny_model.image_token_id).sum()) == n * len(s.images)
        assert batch.attention_mask[r, 0] == 1
        supervised = batch.labels[r] != IGNORE_INDEX
        assert supervised.any() and not (supervised & (batch.input_ids[r] == tiny_model.image_token_id)).any()
    pixels = torch.stack([tiny_model.encoder.preprocess(load_image(p)) for s in samples for p in s.images])
    assert torch.equal(batch.pixels, pixels)


def test_generation_batches_are_left_padded_prompts(tiny_model: VisionLanguageModel, tiny_world: WorldFiles) -> None:
    samples = load_llava(tiny_world.eval).samples[:3]
    samples.append(Sample("long", [Turn("human", "<image>\nIs there a red circle? Answer yes or no, please.")],
                          [samples[0].images[0]]))
    batch = tiny_model.processor(samples, for_generation=True)
    assert (batch.attention_mask[:, -1] == 1).all() and (batch.attention_mask[:, 0] == 0).any()
    assert (batch.labels == IGNORE_INDEX).all()
    assistant = tiny_model.tokenizer.encode("<|im_start|>assistant\n")
    for row in batch.input_ids.tolist():
        assert row[-len(assistant):] == assistant


def test_processor_round_trips_through_the_model_folder(tiny_model: VisionLanguageModel, tiny_world: WorldFiles,
                                                        tmp_path: Path) -> None:
    folder = tiny_model.save(tmp_path / "model")
    data = json.loads((folder / PROCESSOR_FILE).read_text())
    assert data["tokens_per_image"] == 16 and data["image_layout"] == "raster" and data["image_token"] == "<image>"
    assert data["image"]["size"] == [64, 64] and data["image"]["mean"] == [0.5, 0.5, 0.5]
    assert data["max_length"] == tiny_model.max_length
    # Read back without any model: the same batches, and collation needs no model either.
    proc = Processor.from_pretrained(folder)
    assert proc.to_dict() == tiny_model.processor.to_dict()
    assert proc.image_token_id == tiny_model.image_token_id
    samples = _samples(tiny_world)
    a, b = proc(samples), tiny_model.processor(samples)
    for name in ("input_ids", "attention_mask", "labels", "pixels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_collation_with_a_feature_cache_needs_no_model(tiny_model: VisionLanguageModel, tiny_world: WorldFiles,
                                                       tmp_path: Path) -> None:
    proc = Processor.from_pretrained(tiny_model.save(tmp_path / "model"))
    samples = _samples(tiny_world)
    paths = [str(p) for s in samples for p in s.images]
    cache = FeatureCache.build(tiny_model.encoder, paths, show_progress=False, preprocess=proc.image)
    prepared, _ = proc.prepare(samples)
    batch = proc.collate(prepared, features=cache)
    assert batch.pixels is None and batch.features.shape == (3, 16, 32)
    with torch.no_grad():
        expected = tiny_model.encode_images(proc(samples).pixels)
    torch.testing.assert_close(batch.features, expected, rtol=1e-2, atol=1e-2)
    blank = proc.collate(prepared, features=FeatureCache.build(tiny_model.encoder, paths[:1], show_progress=False),
                         override_images=paths[:1])
    assert torch.equal(blank.features, blank.features[:1].expand(3, -1, -1))


def test_feature_cache_file_depends_on_the_preprocessing(tiny_model: VisionLanguageModel, tiny_world: WorldFiles,
                                                         tmp_path: Path) -> None:
    paths = [str(p) for p in _samples(tiny_world, 1)[0].images]
    FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False)
    padded = tiny_model.encoder.preprocessing
    padded.pad_to_square = True
    FeatureCache.build(tiny_model.encoder, paths, cache_dir=tmp_path, show_progress=False, preprocess=padded)
    assert len([p for p in tmp_path.glob("features-*") if (p / "index.json").is_file()]) == 2


def test_bad_samples_are_skipped_or_raised_naming_the_sample(tiny_model: VisionLanguageModel,
                                                             tiny_world: WorldFiles) -> None:
    good = _samples(tiny_world, 1)[0]
    bad = Sample("two-placeholders", [Turn("human", "<image><image> what?"), Turn("gpt", "red")], good.images,
                 source="x.json")
    with pytest.raises(DataError, match=r"\[file x.json, sample 'two-placeholders'\] 32 image-token positions"):
        tiny_model.processor.prepare([good, bad])
    prepared, skipped = tiny_model.processor.prepare([good, bad], on_error="skip")
    assert [p.sample.id for p in prepared] == [good.id] and skipped[0][0] == "two-placeholders"


def test_a_missing_image_is_named_at_collation(tiny_model: VisionLanguageModel, tmp_path: Path) -> None:
    s = Sample("s1", [Turn("human", "<image>\nWhat?"), Turn("gpt", "red")], [tmp_path / "gone.png"], source="d.json")
    with pytest.raises(DataError, match=r"\[file d.json, sample 's1'\] image not found: .*gone.png"):
        tiny_model.processor([s])


def test_processor_config_rejects_unknown_keys(tiny_model: VisionLanguageModel, tmp_path: Path) -> None:
    folder = tiny_model.save(tmp_path / "model")
    data = json.loads((folder / PROCESSOR_FILE).read_text())
    data["image"]["size_"] = 3
    (folder / PROCESSOR_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['size_'\]"):
        Processor.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match=f"has no {PROCESSOR_FILE}"):
        Processor.from_pretrained(tmp_path)
    del data["image"]["size_"]
    data["image_layout"] = "spiral"
    (folder / PROCESSOR_FILE).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown image layout 'spiral'; known: quadrants, raster"):
        Processor.from_pretrained(folder)


def test_the_processor_follows_the_encoders_preprocessing(tiny_model: VisionLanguageModel) -> None:
    image = Image.new("RGB", (80, 40), (200, 100, 50))
    before = tiny_model.processor.preprocess(image)
    tiny_model.encoder.pad_to_square = True  # e.g. the pad_to_square encoder option
    padded = tiny_model.processor.preprocess(image)
    assert before.shape == padded.shape == (3, 64, 64)
    # The padding rows carry the mean colour, which normalises to about zero.
    assert padded[:, 0].abs().max() < 0.01 and not torch.allclose(before, padded)


def test_inference_paths_do_not_import_training_code() -> None:
    code = ("import sys, chiasm.chat, chiasm.eval.evaluate, chiasm.processor\n"
            "print(sorted(m for m in sys.modules if m == 'chiasm.train' or m.startswith('chiasm.train.')))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_images_in_memory_give_the_same_pixels_as_files(tiny_model: VisionLanguageModel,
                                                        tiny_world: WorldFiles) -> None:
    samples = _samples(tiny_world, 2)
    paths = [p for s in samples for p in s.images]
    proc = tiny_model.processor
    assert torch.equal(proc.pixels([load_image(p) for p in paths]), proc(samples).pixels)
