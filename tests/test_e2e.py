"""The whole path on tiny from-scratch parts: config file -> train (2 stages) -> eval -> report -> chat."""

from __future__ import annotations

import json
from pathlib import Path

from chiasm.cli import main


def test_train_eval_report_chat_from_a_toml_config(tiny_lm_dir: Path, tiny_world, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(f"""
output_dir = "{out}"
seed = 1
precision = "fp32"

[model]
system_prompt = "Be brief."

[model.encoder]
name = "tiny-vit"
image_size = 64
options = {{ patch = 16, dim = 32 }}

[model.bridge]
name = "mlp"

[model.lm]
source = "{tiny_lm_dir}"

[[stages]]
name = "align"
data = "{tiny_world.align}"
max_steps = 3
batch_size = 4
lr = 1e-2
lm = {{ mode = "frozen" }}

[[stages]]
name = "instruct"
data = "{tiny_world.instruct}"
max_steps = 3
batch_size = 4
lr = 1e-2
lm = {{ mode = "lora", lora_r = 4 }}

[eval]
data = "{tiny_world.eval}"
retention_tokens = 600
retention_prompts = 3
""")
    assert main(["train", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "language retention" in printed
    results = json.loads((out / "eval.json").read_text())
    assert results["vqa"]["n"] == 20 and set(results["vqa"]["per_type"]) == {
        "colour", "count", "existence", "position", "shape"}
    assert 0 <= results["blank"]["overall"] <= 1 and results["retention"]["n_prompts"] == 3
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    saved = json.loads((out / "config.json").read_text())
    assert saved["stages"][1]["lm"]["mode"] == "lora"
    for stage in ("align", "instruct"):
        assert len((out / "stages" / stage / "metrics.jsonl").read_text().splitlines()) == 3

    image = next((tiny_world.image_dir / "eval").glob("*.png"))
    assert main(["chat", "--model", str(out / "model"), "--image", str(image), "--max-new-tokens", "4",
                 "How many objects are there?"]) == 0
    capsys.readouterr()  # an untrained tiny LM may answer with anything, even nothing; it must not fail


def test_train_reports_bad_data_clearly(tiny_lm_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "bad.json"
    data.write_text(json.dumps([{"id": "s1", "image": "missing.png",
                                 "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                   {"from": "gpt", "value": "Hello"}]}]))
    config = tmp_path / "bad.toml"
    config.write_text(f"""
output_dir = "{tmp_path / 'run'}"
[model.encoder]
name = "tiny-vit"
image_size = 64
[model.lm]
source = "{tiny_lm_dir}"
[[stages]]
name = "align"
data = "{data}"
""")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "s1" in err and str(data) in err
