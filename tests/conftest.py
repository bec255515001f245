"""Shared fixtures: a tiny LM folder, a tiny synthetic world and a tiny VLM built from them.

Everything here is randomly initialised and small enough that building a model takes
milliseconds, so model fixtures are function-scoped (each test gets its own copy to
mutate: policies, LoRA, saving) while the files on disk are written once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig
from chiasm.data.llava import load_llava
from chiasm.model import VisionLanguageModel
from chiasm.synthetic.world import WorldFiles, make_world
from chiasm.testing import make_tiny_lm, spread_weights

# The test models are tiny: one thread is faster than several spinning over 64-wide matmuls,
# and it keeps the suite quick on a machine that is busy with other work.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + BPE tokenizer (ChatML template) saved as a transformers folder."""
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> WorldFiles:
    """A small synthetic world: 32 training images, 4 held-out images (20 questions), 64 px."""
    return make_world(tmp_path_factory.mktemp("tiny-world"), n_train=32, n_eval=4, image_size=64)


def tiny_config(lm_dir: Path) -> ModelConfig:
    """tiny-vit (64 px, 16 px patches, width 32) -> mlp -> the LM in ``lm_dir``.

    The encoder yields a 4 x 4 grid, so one image occupies 16 sequence positions.
    """
    return ModelConfig(
        encoder=EncoderConfig(name="tiny-vit", image_size=64, options={"patch": 16, "dim": 32}),
        bridge=BridgeConfig(name="mlp"),
        lm=LMConfig(source=str(lm_dir)),
    )


@pytest.fixture
def tiny_model_config(tiny_lm_dir: Path) -> ModelConfig:
    """A fresh :func:`tiny_config` per test (tests mutate it)."""
    return tiny_config(tiny_lm_dir)


@pytest.fixture
def tiny_model(tiny_model_config: ModelConfig) -> VisionLanguageModel:
    """A freshly built VisionLanguageModel from ``tiny_model_config``, seeded so runs repeat."""
    torch.manual_seed(0)
    return VisionLanguageModel.build(tiny_model_config)


@pytest.fixture
def saved_model(tiny_model: VisionLanguageModel, tmp_path: Path) -> Path:
    """``tiny_model`` saved as a model folder, for the CLI and chat tests."""
    return tiny_model.save(tmp_path / "model")


@pytest.fixture(scope="session")
def saved_model_dir(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model (as ``tiny_model`` builds it) saved once per session, for tests that only read it."""
    torch.manual_seed(0)
    return VisionLanguageModel.build(tiny_config(tiny_lm_dir)).save(tmp_path_factory.mktemp("saved") / "model")


@pytest.fixture
def image(tiny_world: WorldFiles) -> Path:
    """The first held-out image of the tiny world."""
    return load_llava(tiny_world.eval).samples[0].images[0]


@pytest.fixture
def spread_model(tiny_model: VisionLanguageModel) -> VisionLanguageModel:
    """``tiny_model`` with wide random weights, so its answers depend on the prompt and the images."""
    return spread_weights(tiny_model).eval()


@pytest.fixture
def eval_images(tiny_world: WorldFiles) -> list[Path]:
    """The held-out images of the tiny world, in name order."""
    return sorted((tiny_world.image_dir / "eval").glob("*.png"))
