"""Encoder and bridge options are config keys: unknown or mistyped ones are config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from chiasm.bridges import build_bridge
from chiasm.config import BridgeConfig, ConfigError, EncoderConfig, ModelConfig, load_config
from chiasm.encoders import build_encoder
from chiasm.options import bridge_option_types, check_model_options, encoder_option_types


def test_a_misspelt_bridge_option_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError, match=r"bridge 'mlp': bad options \{'hiden': 48\}: unknown option\(s\) "
                                          r"\['hiden'\]; allowed: \['hidden', 'norm', 'pos_dim', 'upsample'\]"):
        build_bridge(BridgeConfig(name="mlp", options={"hiden": 48}), 32, 64)
    with pytest.raises(ConfigError, match=r"bridge 'linear': .*allowed: none"):
        build_bridge(BridgeConfig(name="linear", options={"hidden": 48}), 32, 64)


def test_a_mistyped_bridge_option_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"bridge 'mlp' option 'hidden': expected int, got '48'"):
        build_bridge(BridgeConfig(name="mlp", options={"hidden": "48"}), 32, 64)
    with pytest.raises(ConfigError, match=r"bridge 'resampler' option 'num_queries': expected int, got True"):
        build_bridge(BridgeConfig(name="resampler", options={"num_queries": True}), 32, 64)
    # The right types pass.
    assert build_bridge(BridgeConfig(name="mlp", options={"hidden": 48, "norm": True}), 32, 64).fc1.out_features == 48


def test_encoder_options_are_checked_even_where_the_encoder_would_ignore_them() -> None:
    with pytest.raises(ConfigError, match=r"encoder 'tiny-vit': bad options .*unknown option\(s\) \['pach'\]; "
                                          r"allowed: \['depth', 'dim', 'heads', 'pad_to_square', 'patch'\]"):
        build_encoder(EncoderConfig(name="tiny-vit", image_size=64, options={"pach": 16}))
    with pytest.raises(ConfigError, match=r"encoder 'tiny-vit' option 'dim': expected int, got 32.5"):
        build_encoder(EncoderConfig(name="tiny-vit", image_size=64, options={"dim": 32.5}))


def test_option_types_come_from_signatures_and_tables() -> None:
    assert set(bridge_option_types("pooling")) == {"kernel", "hidden"}
    assert set(encoder_option_types("efficientnet-lite0")) == {"pretrained", "extra_blocks", "final", "grid",
                                                                "pad_to_square"}
    assert {"normalize", "mean", "std", "interpolate_pos_encoding"} <= set(encoder_option_types("hf-vision"))


def test_union_options_take_any_member() -> None:
    # efficientnet's grid: an int (square) or [h, w]; neither a string nor a list of strings.
    for grid in (2, [2, 3]):
        check_model_options(ModelConfig(encoder=EncoderConfig(options={"grid": grid})))
    with pytest.raises(ConfigError, match="grid"):
        check_model_options(ModelConfig(encoder=EncoderConfig(options={"grid": "2x2"})))


def test_a_config_file_with_a_bad_option_fails_when_read(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[model.encoder]\nname = "tiny-vit"\noptions = { patch = 16 }\n'
                    '[model.bridge]\nname = "mlp"\noptions = { norm = "yes" }\n')
    with pytest.raises(ConfigError, match=r"bridge 'mlp' option 'norm': expected bool, got 'yes'"):
        load_config(path)
    path.write_text('[model.bridge]\nname = "mlpp"\n')
    with pytest.raises(ConfigError, match=r"RunConfig.model: unknown bridge 'mlpp'; known: .*mlp"):
        load_config(path)
