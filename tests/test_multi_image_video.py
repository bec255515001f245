"""Several images per conversation, video frames with time markers, and the image-token budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from chiasm.config import ModelConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import load_llava
from chiasm.data.sample import DataError, Sample, Turn
from chiasm.data.video import fit_budget, read_frames, video_turn_text
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.seeing import make_seeing_world
from chiasm.train.trainer import Trainer


def test_frames_from_a_folder_are_sampled_evenly_in_number_order(tmp_path: Path) -> None:
    for k in range(1, 13):
        Image.new("RGB", (8, 8), (k * 20, 0, 0)).save(tmp_path / f"frame-{k}.png")
    paths, times = read_frames(tmp_path, 4, fps=2.0)
    assert [p.name for p in paths] == ["frame-1.png", "frame-5.png", "frame-8.png", "frame-12.png"]
    assert times == [0.0, 2.0, 3.5, 5.5]


def test_an_undecodable_video_names_file_and_sample(tmp_path: Path) -> None:
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(DataError, match=r"file d.json, sample 'v1'.*clip.mp4: cannot decode"):
        read_frames(bad, 4, sample_id="v1", data_file="d.json")
    with pytest.raises(DataError, match="no frame images"):
        read_frames(tmp_path, 4)  # a folder with no frames


def _video_sample(n: int) -> Sample:
    return Sample("v", [Turn("human", video_turn_text(n) + "\nWhat changed?"), Turn("gpt", "x")],
                  [Path(f"f{k}.png") for k in range(n)], source="d.json")


def test_budget_drops_frames_and_says_which_or_refuses() -> None:
    sample = _video_sample(6)
    fitted, dropped = fit_budget(sample, [16] * 6, 64, drop="frames")
    assert len(fitted.images) == 4 and fitted.conversations[0].text.count("<image>") == 4
    assert dropped == ["frame 2 (1.0 s)", "frame 5 (4.0 s)"] and fitted.meta["dropped_frames"] == dropped
    with pytest.raises(DataError, match=r"sample 'v'.*96 image tokens, over the budget of 64"):
        fit_budget(sample, [16] * 6, 64)
    with pytest.raises(DataError, match="cannot hold even one image's global view"):
        fit_budget(sample, [16] * 6, 10, drop="frames")


def test_multi_image_and_clip_worlds_tokenise(tiny_model: VisionLanguageModel, tmp_path: Path) -> None:
    which = load_llava(make_seeing_world("which_image", tmp_path / "w", n_train=4, n_eval=2,
                                         image_size=64)["eval"]).samples
    clips = load_llava(make_seeing_world("what_changed", tmp_path / "c", n_train=2, n_eval=2,
                                         image_size=64)["train"]).samples
    proc = tiny_model.processor
    two = which[0]
    multi_turn = Sample("mt", [Turn("human", "<image> first?"), Turn("gpt", "yes"),
                               Turn("human", "and <image> with <image>?"), Turn("gpt", "no")],
                        [two.images[0]] * 3, source="m.json")
    prepared, _ = proc.prepare([two, clips[0], multi_turn])
    counts = [p.encoded.input_ids.count(tiny_model.image_token_id) for p in prepared]
    assert counts == [16 * len(two.images), 16 * 4, 16 * 3]
    batch = proc.collate(prepared)
    assert batch.pixels.shape[0] == len(two.images) + 4 + 3
    assert float(tiny_model(batch.input_ids, batch.attention_mask, batch.labels, pixels=batch.pixels).loss) > 0
    kept, skipped = proc.prepare(clips, image_token_budget=40, on_error="skip")
    assert not kept and len(skipped) == 2 and "over the budget of 40" in skipped[0][1]
    kept, _ = proc.prepare(clips, image_token_budget=40, drop="frames")
    assert [len(p.sample.images) for p in kept] == [2, 2] and kept[0].sample.meta["dropped_frames"]


def test_which_image_world_writes_each_training_image_with_its_caption(tmp_path: Path) -> None:
    files = make_seeing_world("which_image", tmp_path / "w", n_train=5, n_eval=2, image_size=48)
    train = load_llava(files["train"]).samples
    captions = load_llava(files["captions"]).samples
    assert [c.images[0] for c in captions] == [p for s in train for p in s.images]  # training images only
    assert all(len(c.images) == 1 and c.conversations[0].text == "<image>\nWhat is in the image?" for c in captions)
    for s in train:  # the image the answer names is the one whose caption the question asks about
        pick = ("first", "second", "third").index(s.conversations[1].text)
        caption = next(c for c in captions if c.images[0] == s.images[pick]).conversations[1].text
        assert f"has the {caption[2:]}?" in s.conversations[0].text
    assert "captions" not in make_seeing_world("what_changed", tmp_path / "c", n_train=1, n_eval=1, image_size=48)


def test_frames_from_a_video_file_with_their_times(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    import numpy as np

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(8):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), k * 30, np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    paths, times = read_frames(path, 3, cache_dir=tmp_path / "frames")
    assert len(paths) == 3 and times == pytest.approx([0.0, 1.0, 1.75])  # frames 0, 4 and 7 of 8 at 4 fps
    shades = [Image.open(p).getpixel((10, 10))[0] for p in paths]
    assert shades[0] < shades[1] < shades[2]


def _clip_stage(world: Path, **kw) -> StageConfig:
    return StageConfig(name="instruct", data=str(world), encoder=PolicyConfig(mode="frozen"), lr=1e-2,
                       batch_size=2, max_steps=1, image_token_budget=40, **kw)


def test_a_stage_budget_drops_frames_or_refuses_naming_the_sample(tiny_model_config: ModelConfig,
                                                                  tmp_path: Path) -> None:
    """Four 16-token frames over a 40-token budget: two frames go (listed), or the sample is refused."""
    world = make_seeing_world("what_changed", tmp_path / "c", n_train=3, n_eval=1, image_size=64)["train"]

    def run(out: str, **kw) -> Path:
        Trainer(RunConfig(model=tiny_model_config, output_dir=str(tmp_path / out), precision="fp32",
                          stages=[_clip_stage(world, **kw)]), show_progress=False).run()
        return tmp_path / out / "stages" / "instruct"

    stage_dir = run("drop", budget_drop="frames")
    lines = [json.loads(x) for x in (stage_dir / "budget_dropped.jsonl").read_text().splitlines()]
    assert [d["id"] for d in lines] == [f"what_changed-train-{i}" for i in range(3)]
    assert all(d["dropped"] == ["frame 2 (1.0 s)", "frame 3 (2.0 s)"] for d in lines)
    with pytest.raises(DataError, match=r"sample 'what_changed-train-0'.*64 image tokens, over the budget of 40"):
        run("refuse")
    with pytest.raises(ValueError, match="budget_drop must be 'none' or 'frames'"):
        _clip_stage(world, budget_drop="tiles")
