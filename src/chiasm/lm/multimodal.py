"""The text model of a multimodal checkpoint (Gemma 3 4B and up, LLaVA-style folders) as a plain causal LM.

transformers' class for such a checkpoint is the whole multimodal model: used as chiasm's LM it
would carry its own vision tower beside chiasm's, and the saved model folder would hold a
multimodal model that images never reach. So its language part (decoder and output head) is
copied into the causal-LM class of its text config (``Gemma3ForCausalLM`` for Gemma 3),
which then trains, saves and loads like any text-only LM.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig, PreTrainedModel

from chiasm.errors import ModelFolderError


def is_multimodal(config: PretrainedConfig) -> bool:
    """A config that holds its text model's config as a part (rather than being it)."""
    return config.get_text_config(decoder=True) is not config


def load_text_part(path: str, config: PretrainedConfig, dtype: torch.dtype, **kwargs: Any) -> PreTrainedModel:
    """The causal LM of ``config``'s text config, with the language weights of the multimodal checkpoint."""
    text = config.get_text_config(decoder=True)
    refuse = (f"language model {path}: a multimodal checkpoint ({config.model_type}) whose language part chiasm "
              f"cannot take out")
    if type(config) not in AutoModelForImageTextToText._model_mapping:
        raise ModelFolderError(f"{refuse} (transformers has no image-text-to-text class for it); use a text-only "
                               "checkpoint of its LM")
    full = AutoModelForImageTextToText.from_pretrained(path, config=config, dtype=dtype, **kwargs)
    inner = getattr(getattr(full, "model", None), "language_model", None)
    head = full.get_output_embeddings()
    if inner is None or head is None:
        raise ModelFolderError(f"{refuse} (no model.language_model and output head in {type(full).__name__}); use "
                               "a text-only checkpoint of its LM")
    lm = AutoModelForCausalLM.from_config(text, dtype=dtype, **kwargs)
    lm.get_decoder().load_state_dict(inner.state_dict())
    lm.get_output_embeddings().load_state_dict(head.state_dict())
    lm.generation_config = full.generation_config
    return lm.eval()
