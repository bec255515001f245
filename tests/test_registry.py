"""Registries: exact names only, helpful errors, one class per name."""

from __future__ import annotations

import pytest

from chiasm.bridges import BRIDGES
from chiasm.bridges.projectors import LinearBridge, MLPBridge
from chiasm.config import BridgeConfig, EncoderConfig
from chiasm.encoders import ENCODERS, build_encoder
from chiasm.encoders.hf_vision import HFVisionTower
from chiasm.encoders.tiny_vit import TinyViT
from chiasm.registry import Registry


def test_exact_name_lookup() -> None:
    assert ENCODERS.get("tiny-vit") is TinyViT
    assert ENCODERS.get("hf-vision") is HFVisionTower
    assert BRIDGES.get("linear") is LinearBridge
    assert BRIDGES.get("mlp") is MLPBridge
    assert "tiny-vit" in ENCODERS and "mlp" in BRIDGES
    assert {"efficientnet-lite0", "hf-vision", "tiny-vit"} <= set(ENCODERS.names())
    assert ENCODERS.names() == sorted(ENCODERS.names())


def test_unknown_name_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        BRIDGES.get("no-such-bridge")
    msg = str(info.value)
    assert "bridge" in msg and "'no-such-bridge'" in msg
    for name in BRIDGES.names():
        assert name in msg


@pytest.mark.parametrize("name", ["tiny", "vit", "tiny-vit-small", "TINY-VIT", " tiny-vit", "tiny_vit", ""])
def test_no_fuzzy_matching(name: str) -> None:
    assert name not in ENCODERS
    with pytest.raises(KeyError, match="known: chiasm-clip, efficientnet-lite0, hf-vision, tiny-vit"):
        ENCODERS.get(name)


def test_build_with_unknown_name_fails() -> None:
    with pytest.raises(KeyError, match="unknown encoder 'openai/clip-vit'"):
        build_encoder(EncoderConfig(name="openai/clip-vit"))
    from chiasm.bridges import build_bridge

    with pytest.raises(KeyError, match="unknown bridge 'MLP'"):
        build_bridge(BridgeConfig(name="MLP"), 8, 8)


def test_double_registration_is_an_error() -> None:
    reg: Registry[object] = Registry("widget")

    @reg.register("a")
    class A:
        pass

    with pytest.raises(ValueError, match=r"widget 'a' is already registered by A"):

        @reg.register("a")
        class B:
            pass

    assert reg.get("a") is A
    assert reg.names() == ["a"]


def test_double_registration_on_a_real_registry_leaves_it_intact() -> None:
    class Impostor(MLPBridge):
        pass

    with pytest.raises(ValueError, match="already registered by MLPBridge"):
        BRIDGES.register("mlp")(Impostor)
    assert BRIDGES.get("mlp") is MLPBridge
