"""Skipped samples are written per stage, shown in the report, and capped by max_skip_fraction."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from chiasm.config import ModelConfig, PolicyConfig, RunConfig, StageConfig
from chiasm.data.llava import load_llava, save_llava
from chiasm.data.sample import DataError
from chiasm.data.synthetic import WorldFiles
from chiasm.report import write_report
from chiasm.train.skips import SkipLog, read_skips
from chiasm.train.trainer import Interrupted, Trainer

FROZEN = PolicyConfig(mode="frozen")


def _broken_data(world: WorldFiles, tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """The align data with its own copy of the images: two broken, one record's image missing.

    Returns the data file, the image root and the expected reason pattern per skipped id.
    """
    samples = load_llava(world.align).samples
    root = tmp_path / "images"
    root.mkdir()
    for s in samples:
        copy = root / s.images[0].name
        shutil.copy(s.images[0], copy)
        s.images = [copy]
    ids = [s.id for s in samples]
    truncated, text, missing = samples[3], samples[10], samples[20]
    data = truncated.images[0].read_bytes()
    truncated.images[0].write_bytes(data[: len(data) // 3])
    text.images[0].write_text("not a picture")
    save_llava(samples, tmp_path / "align.jsonl", root)
    missing.images[0].unlink()
    assert len(ids) == 32
    return tmp_path / "align.jsonl", root, {
        truncated.id: "cannot decode image", text.id: "cannot identify image file", missing.id: "image not found"}


def _config(model_cfg: ModelConfig, data: Path, root: Path, out: Path, **stage_kw) -> RunConfig:
    kw = {"encoder": FROZEN, "lm": FROZEN, "batch_size": 4, "lr": 1e-2, "on_error": "skip",
          "max_skip_fraction": 0.1, **stage_kw}
    stage = StageConfig(name="align", data=str(data), image_root=str(root), **kw)
    return RunConfig(model=model_cfg, stages=[stage], output_dir=str(out), seed=3, precision="fp32")


def _skipped(run: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_skips(run / "stages" / "align" / "skipped.jsonl")}


def test_frozen_stage_skips_broken_images_before_training(tiny_model_config, tiny_world, tmp_path) -> None:
    data, root, expected = _broken_data(tiny_world, tmp_path)
    run = tmp_path / "run"
    trainer = Trainer(_config(tiny_model_config, data, root, run, max_steps=2), show_progress=False)
    encoded = []
    forward = trainer.model.encoder.forward
    trainer.model.encoder.forward = lambda x: encoded.append(x.shape[0]) or forward(x)
    trainer.run()
    skipped = _skipped(run)
    assert skipped.keys() == expected.keys()
    for sid, reason in expected.items():
        assert reason in skipped[sid]["reason"] and sid in skipped[sid]["reason"], skipped[sid]
        assert skipped[sid]["file"] == str(data)
    broken = {s: r["image"] for s, r in skipped.items() if "image not found" not in r["reason"]}
    assert all(image.startswith(str(root)) for image in broken.values()) and len(broken) == 2
    assert sum(encoded) == 29  # every good image encoded once; the broken ones never reach the encoder
    lines = (run / "stages" / "align" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    html = write_report(run).read_text()
    assert "Skipped samples" in html and "<td>align</td><td class=\"num\">3</td>" in html
    assert "cannot decode image" in html


def test_over_the_fraction_the_stage_stops_before_training(tiny_model_config, tiny_world, tmp_path) -> None:
    data, root, expected = _broken_data(tiny_world, tmp_path)
    run = tmp_path / "run"
    cfg = _config(tiny_model_config, data, root, run, max_skip_fraction=0.05)
    where = rf"\[file {re.escape(str(data))}\] "
    with pytest.raises(DataError, match=where + r"stage 'align': 3 of 32 records skipped \(9\.4%\), "
                                        r"over max_skip_fraction 5\.0%; first reasons: .*image not found"):
        Trainer(cfg, show_progress=False).run()
    assert not (run / "stages" / "align" / "metrics.jsonl").exists() or \
        not (run / "stages" / "align" / "metrics.jsonl").read_text()
    assert _skipped(run).keys() == expected.keys()  # what was found is written all the same


def test_raise_mode_names_the_broken_image_its_sample_and_file(tiny_model_config, tiny_world, tmp_path) -> None:
    data, root, expected = _broken_data(tiny_world, tmp_path)
    cfg = _config(tiny_model_config, data, root, tmp_path / "run", on_error="raise")
    where = rf"\[file {re.escape(str(data))}, sample '(?P<id>[^']+)'\] "
    with pytest.raises(DataError, match=where + r"line \d+: image not found") as info:
        Trainer(cfg, show_progress=False).run()
    missing = re.match(where, str(info.value))["id"]
    assert expected[missing] == "image not found"
    # With the missing image back, the next refusal is a broken image, found by the cache build.
    sample = next(s for s in load_llava(tiny_world.align).samples if s.id == missing)
    shutil.copy(sample.images[0], root / sample.images[0].name)
    with pytest.raises(DataError, match=where + r"cannot decode image") as info:
        Trainer(cfg, show_progress=False).run()
    assert re.match(where, str(info.value))["id"] in expected


def test_unfrozen_encoder_drops_broken_images_from_batches(tiny_model_config, tiny_world, tmp_path) -> None:
    data, root, expected = _broken_data(tiny_world, tmp_path)
    run = tmp_path / "run"
    cfg = _config(tiny_model_config, data, root, run, encoder=PolicyConfig(mode="full"), epochs=1.0)
    Trainer(cfg, show_progress=False).run()  # one epoch: every sample is drawn once
    skipped = _skipped(run)
    assert skipped.keys() == expected.keys()
    assert all(expected[sid] in r["reason"] for sid, r in skipped.items())
    lines = (run / "stages" / "align" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 7  # 29 usable samples: 7 steps of 4
    # A stricter cap stops the run when the broken images are met in the batches.
    cfg = _config(tiny_model_config, data, root, tmp_path / "strict", encoder=PolicyConfig(mode="full"),
                  max_skip_fraction=0.04)
    with pytest.raises(DataError, match=r"records skipped .* over max_skip_fraction 4\.0%"):
        Trainer(cfg, show_progress=False).run()


def test_skip_log_counts_each_sample_once_and_writes_jsonl(tmp_path: Path) -> None:
    log = SkipLog("s", "d.jsonl", total=10, max_fraction=0.2, out=tmp_path / "stages" / "s")
    assert log.add("a", "bad image", image="x.png") and not log.add("a", "again")
    log.add_error(DataError("broken", sample_id="b", source="d.jsonl", image="y.png"))
    log.check()  # 2 of 10 is at the cap, not over it
    path = log.write()
    assert [json.loads(x) for x in path.read_text().splitlines()] == [
        {"id": "a", "file": "d.jsonl", "image": "x.png", "reason": "bad image"},
        {"id": "b", "file": "d.jsonl", "image": "y.png", "reason": "[file d.jsonl, sample 'b'] broken"}]
    log.add("c", "<script>")
    with pytest.raises(DataError, match=r"3 of 10 records skipped \(30\.0%\), over max_skip_fraction 20\.0%"):
        log.check()
    with pytest.raises(ValueError, match="max_skip_fraction must be in"):
        SkipLog("s", "d", total=1, max_fraction=1.5)


def test_report_lists_skips_escaped_with_the_first_reasons(tmp_path: Path) -> None:
    run = tmp_path / "run"
    folder = run / "stages" / "instruct"
    folder.mkdir(parents=True)
    (run / "stages.json").write_text(json.dumps(["instruct"]))
    log = SkipLog("instruct", "d.jsonl", total=100, max_fraction=1.0, out=folder)
    for i in range(5):
        log.add(f"id{i}", f"reason <{i}>")
    log.write()
    html = write_report(run).read_text()
    assert '<td>instruct</td><td class="num">5</td>' in html
    assert ("reason &lt;0&gt;<br>reason &lt;1&gt;<br>reason &lt;2&gt;<br>… 2 more in stages/instruct/skipped.jsonl"
            in html)
    assert "reason &lt;3&gt;" not in html


def test_a_micro_batch_with_only_broken_images_is_passed_over(tiny_model_config, tiny_world, tmp_path) -> None:
    data, root, expected = _broken_data(tiny_world, tmp_path)
    run = tmp_path / "run"
    cfg = _config(tiny_model_config, data, root, run, encoder=PolicyConfig(mode="full"), batch_size=1, epochs=1.0)
    Trainer(cfg, show_progress=False).run()
    assert _skipped(run).keys() == expected.keys()
    records = [json.loads(x) for x in (run / "stages" / "align" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 31  # 31 samples pass the loader: one step each
    losses = [r["loss"] for r in records]
    # The two steps whose only sample had a broken image learnt nothing: their loss is NaN, not 0.
    assert sum(math.isnan(x) for x in losses) == 2 and all(x > 0 for x in losses if not math.isnan(x))


@pytest.mark.parametrize("encoder", ["frozen", "full"])
def test_stage_pixel_limit_skips_oversized_images(tiny_model_config, tiny_world, tmp_path, encoder) -> None:
    data, root, expected = _broken_data(tiny_world, tmp_path)
    big = next(s for s in load_llava(data, root, on_error="skip").samples if s.id not in expected)
    width, height = Image.open(big.images[0]).size
    limit = width * height
    Image.new("RGB", (200, 200), (1, 2, 3)).save(big.images[0])
    run = tmp_path / "run"
    cfg = _config(tiny_model_config, data, root, run, encoder=PolicyConfig(mode=encoder), epochs=1.0,
                  max_image_pixels=limit, max_skip_fraction=0.2)
    Trainer(cfg, show_progress=False).run()
    skipped = _skipped(run)
    assert skipped.keys() == {*expected, big.id}
    assert f"has 200x200 = 40000 pixels, over the limit of {limit}" in skipped[big.id]["reason"]


def test_a_resumed_stage_keeps_the_skips_found_before_its_checkpoint(tiny_model_config, tiny_world,
                                                                     tmp_path) -> None:
    data, root, expected = _broken_data(tiny_world, tmp_path)
    run = tmp_path / "run"
    cfg = _config(tiny_model_config, data, root, run, encoder=PolicyConfig(mode="full"), epochs=1.0,
                  checkpoint_every=1)
    with pytest.raises(Interrupted):
        Trainer(cfg, show_progress=False).run(stop_after_steps=6)
    before = _skipped(run)
    assert len(before) > 1  # the load-time skip and at least one broken image met in the first 6 steps
    Trainer(cfg, show_progress=False).run(resume=True)
    after = _skipped(run)
    assert after.keys() == expected.keys() and all(after[k] == v for k, v in before.items())
