"""A transformers LLaVA checkpoint (``LlavaForConditionalGeneration``) -> a chiasm model.

LLaVA-1.5's parts are chiasm's: a CLIP or SigLIP tower read at ``vision_feature_layer``, the
two-layer GELU projector (chiasm's ``mlp`` bridge with its hidden width the LM's) and a causal
LM; the processor's chat template writes ``<image>`` where each image goes and the processor
expands it to one token per patch, which is what chiasm's processor does with a placeholder.
The weights are taken over as they are: the LM's modules are reused (no second copy of the
largest part), the tower and the projector are copied into chiasm's encoder and bridge.

Settings chiasm cannot represent are refused by name before any weight is read: several
feature layers concatenated, LLaVA-NeXT's anyres tiling (``image_grid_pinpoints``), a feature
selection that keeps a class token or drops a patch, another projector activation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration

from chiasm.bridges.base import build_bridge
from chiasm.chat_template import ChatTemplate
from chiasm.config import BridgeConfig, EncoderConfig, LMConfig, ModelConfig
from chiasm.encoders.base import build_encoder
from chiasm.encoders.hf_vision import _vision_part
from chiasm.interop import NotRepresentable
from chiasm.interop.towers import LEADING_TOKENS, strategy_for, tower_problem
from chiasm.lm.loader import DTYPES, dtype_name, torch_dtype
from chiasm.model import VisionLanguageModel
from chiasm.sources import hub_errors
from chiasm.tokens import IMAGE_TOKEN

# Where hub_errors says trust_remote_code would go: nowhere, LLaVA is built into transformers.
SECTION = "no table (chiasm import reads transformers' own LLaVA and runs no code shipped with a checkpoint)"


def llava_problems(config: Any) -> list[str]:
    """Every setting of a LLaVA ``config`` that chiasm cannot represent (empty: importable)."""
    if getattr(config, "image_grid_pinpoints", None):
        return [f"image_grid_pinpoints {list(config.image_grid_pinpoints)[:3]}...: LLaVA-NeXT's anyres tiling "
                "(a varying number of tiles per image); chiasm gives every image one fixed grid of tokens"]
    if config.model_type != "llava":
        return [f"model_type {config.model_type!r}: chiasm imports 'llava' (LLaVA-1.5 style) checkpoints"]
    problems = []
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        problems.append(f"vision_feature_layer {list(layer)}: several tower layers concatenated; chiasm's encoder "
                        "reads one layer")
    tower = config.vision_config.model_type
    strategy = config.vision_feature_select_strategy
    if tower_problem(tower):
        problems.append(tower_problem(tower))
    elif strategy != strategy_for(tower):
        kept = "keeps the class token beside the patch grid" if LEADING_TOKENS[tower] else \
            "drops the first patch of a tower that has no class token"
        problems.append(f"vision_feature_select_strategy {strategy!r} with a {tower} tower {kept}; chiasm's "
                        f"encoder gives the patch grid alone ({strategy_for(tower)!r})")
    if config.projector_hidden_act != "gelu":
        problems.append(f"projector_hidden_act {config.projector_hidden_act!r}: chiasm's mlp bridge uses GELU")
    return problems


def _processor_problems(processor: Any, config: Any, grid_tokens: int) -> list[str]:
    """The processor must write ``<image>`` for the config's image token and expand it to the tower's grid."""
    problems = []
    token = processor.tokenizer.convert_ids_to_tokens(config.image_token_id)
    if token != IMAGE_TOKEN or getattr(processor, "image_token", IMAGE_TOKEN) != IMAGE_TOKEN:
        problems.append(f"image token {getattr(processor, 'image_token', token)!r} (id {config.image_token_id} is "
                        f"{token!r}): chiasm's image placeholder is {IMAGE_TOKEN!r}")
    patch, extra = getattr(processor, "patch_size", None), getattr(processor, "num_additional_image_tokens", 0)
    if patch is not None:
        side = config.vision_config.image_size // patch
        expanded = side * side + (extra or 0) - (processor.vision_feature_select_strategy == "default")
        if expanded != grid_tokens:
            problems.append(f"the processor expands <image> to {expanded} tokens (patch_size {patch}, "
                            f"num_additional_image_tokens {extra}) but the model reads {grid_tokens} features")
    return problems


def processor_adds_bos(tokenizer: Any) -> bool:
    """Whether transformers' processor puts a BOS before the rendered prompt that chiasm's tokenisation would not.

    The processor tokenises the template's text with the tokenizer's special tokens unless the
    text starts with BOS already (a Llama tokenizer adds one; LLaVA-1.5's template writes none);
    chiasm tokenises the template's text as it is.
    """
    bos = tokenizer.bos_token
    if bos is None or tokenizer.chat_template is None:
        return False
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    if ids[:1] != [tokenizer.bos_token_id] or ids[1 : 1 + len(plain)] != plain:
        return False
    return not ChatTemplate(tokenizer).render([{"role": "user", "content": "a"}]).startswith(bos)


def _checkpoint_dtype(config: Any) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config.text_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype_name(dtype) if dtype in DTYPES.values() else "fp32"


def import_llava(folder: str | Path, *, dtype: str | None = None) -> VisionLanguageModel:
    """Read a ``LlavaForConditionalGeneration`` folder as a chiasm model (in eval mode).

    ``dtype`` ("fp32", "bf16", "fp16") is the LM's; None keeps the checkpoint's. The encoder and
    the bridge are float32, as in every chiasm model. The config's sources record ``folder``,
    which holds no plain causal LM: evaluation's language-retention baseline needs the saved
    model's own ``lm/`` as its LM source, which ``chiasm import`` sets.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; give the folder of a transformers LLaVA checkpoint")
    with hub_errors(str(folder), "LLaVA checkpoint", SECTION):
        config = AutoConfig.from_pretrained(folder)
    problems = llava_problems(config)
    if problems:
        raise NotRepresentable(f"{folder} cannot be imported", problems)
    with hub_errors(str(folder), "LLaVA checkpoint", SECTION):
        processor = AutoProcessor.from_pretrained(folder, backend="pil")
    if not hasattr(processor, "image_processor"):  # AutoProcessor gives the bare tokenizer where no processor is saved
        raise NotRepresentable(f"{folder} cannot be imported", [
            "no image processor (processor_config.json or preprocessor_config.json): an image's resize and "
            "normalisation would be guessed"])
    tokenizer = processor.tokenizer
    template = getattr(processor, "chat_template", None) or tokenizer.chat_template
    if template is None:
        raise NotRepresentable(f"{folder} cannot be imported", [
            "no chat template (chat_template.jinja or chat_template.json): chiasm builds every prompt with it"])
    tokenizer.chat_template = template
    if processor_adds_bos(tokenizer):
        tokenizer.chat_template = "{{ bos_token }}" + template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = dtype or _checkpoint_dtype(config)
    encoder, enc_cfg = _encoder(folder, config, processor.image_processor)
    problems = _processor_problems(processor, config, encoder.grid()[0] * encoder.grid()[1])
    if problems:
        raise NotRepresentable(f"{folder} cannot be imported", problems)
    with hub_errors(str(folder), "LLaVA checkpoint", SECTION):
        llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch_dtype(dtype))
    with torch.no_grad():
        encoder.tower.load_state_dict(_vision_part(llava.model.vision_tower).state_dict())
    lm = _causal_lm(llava)
    bridge = build_bridge(BridgeConfig(name="mlp"), encoder.dim, lm.config.hidden_size, pretrained=False)
    _copy_projector(llava.model.multi_modal_projector, bridge)
    model_cfg = ModelConfig(encoder=enc_cfg, bridge=BridgeConfig(name="mlp"), lm=LMConfig(source=str(folder)),
                            dtype=dtype)  # type: ignore[arg-type]
    model = VisionLanguageModel(model_cfg, encoder, bridge, lm, tokenizer)
    if model.image_token_id != config.image_token_id:
        raise NotRepresentable(f"{folder} cannot be imported", [
            f"image_token_index {config.image_token_id} is not the tokenizer's {IMAGE_TOKEN} "
            f"(id {model.image_token_id})"])
    return model.eval()


def _encoder(folder: Path, config: Any, image_processor: Any) -> tuple[Any, EncoderConfig]:
    """chiasm's ``hf-vision`` encoder with the tower's config and image processor (weights come next).

    LLaVA-1.5's padding to a square (``LlavaImageProcessor`` with ``do_pad``) is chiasm's
    ``pad_to_square`` option; the rest of the processor (resize, crop, normalise) is read as
    for any tower.
    """
    pad = bool(getattr(image_processor, "do_pad", False)) and hasattr(image_processor, "pad_to_square")
    options = {"pad_to_square": True} if pad else {}
    with tempfile.TemporaryDirectory() as tmp:
        config.vision_config.save_pretrained(tmp)
        if pad:
            image_processor.do_pad = False  # written as chiasm's option instead
        image_processor.save_pretrained(tmp)
        build_cfg = EncoderConfig(name="hf-vision", source=tmp, feature_layer=config.vision_feature_layer,
                                  options=options)
        encoder = build_encoder(build_cfg, pretrained=False)
    # The saved model rebuilds the tower from its own encoder/ folder; the source records the origin.
    return encoder, EncoderConfig(name="hf-vision", source=str(folder), feature_layer=config.vision_feature_layer,
                                  options=options)


def _causal_lm(llava: LlavaForConditionalGeneration) -> torch.nn.Module:
    """A ``*ForCausalLM`` around LLaVA's own text model and head (the same modules, no copy)."""
    text_config = llava.config.text_config
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(text_config)
    setattr(lm, lm.base_model_prefix, llava.model.language_model)
    lm.set_output_embeddings(llava.lm_head)
    left = [n for n, t in [*lm.named_parameters(), *lm.named_buffers()] if t.is_meta]
    if left:
        raise NotRepresentable("the LLaVA language model", [
            f"{type(lm).__name__} holds weights outside its text model and head ({', '.join(left[:4])})"])
    lm.generation_config = llava.generation_config
    return lm.eval()


def _copy_projector(projector: torch.nn.Module, bridge: torch.nn.Module) -> None:
    """linear_1 -> fc1, linear_2 -> fc2; a projector without biases (multimodal_projector_bias) gets zeros."""
    with torch.no_grad():
        for src, dst in ((projector.linear_1, bridge.fc1), (projector.linear_2, bridge.fc2)):
            dst.weight.copy_(src.weight)
            if src.bias is None:
                dst.bias.zero_()
            else:
                dst.bias.copy_(src.bias)
