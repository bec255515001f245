"""A chiasm model -> a transformers LLaVA folder: what ``AutoModelForImageTextToText``,
``AutoProcessor`` and vLLM load (``model_type`` llava, safetensors).

Only what LLaVA computes exactly is written: a CLIP or SigLIP tower read at one layer, and a
bridge that LLaVA's ``linear_1 -> GELU -> linear_2`` projector reproduces. The ``mlp`` bridge
is that projector; a ``linear`` bridge ``W x + b`` becomes one through ``x = gelu(x) - gelu(-x)``:
``linear_1`` writes ``x`` and ``-x`` side by side, ``linear_2`` applies ``[W, -W]``. Any other
bridge or encoder keeps chiasm's format, and the refusal says which part and why.

The tokenizer gets the image token inside the LM's vocabulary (LLaVA embeds the image token id
before replacing it, vLLM too): where chiasm's id lies past the table, the table grows by rows
equal to the mean row. A mean row's logit is the mean of the other logits, so it never wins a
greedy step: generation is unchanged. The chat template takes transformers' typed content parts
(``{"type": "image"}``); the processor expands each ``<image>`` to the model's tokens per image.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPImageProcessorPil, GenerationConfig, LlavaConfig, LlavaImageProcessorPil, LlavaProcessor

from chiasm.chat_template import ChatTemplate, stop_token_ids
from chiasm.content_parts import accepting_parts
from chiasm.encoders.preprocessing import RESAMPLE, ImagePreprocessing
from chiasm.interop import NotRepresentable
from chiasm.interop.llava import processor_adds_bos
from chiasm.interop.towers import LEADING_TOKENS, strategy_for, tower_problem
from chiasm.model import VisionLanguageModel
from chiasm.tokens import IMAGE_TOKEN

KEEPS_FORMAT = "this model keeps chiasm's format (a LLaVA checkpoint cannot express it)"


def export_problems(model: VisionLanguageModel) -> list[str]:
    """Every part of ``model`` that LLaVA cannot express (empty: exportable)."""
    cfg = model.config
    problems = []
    if cfg.encoder.name != "hf-vision":
        problems.append(f"encoder {cfg.encoder.name!r}: a LLaVA checkpoint's vision tower is a transformers CLIP or "
                        "SigLIP tower (encoder 'hf-vision')")
    else:
        vision = model.encoder.vision_config
        if tower_problem(vision.model_type):
            problems.append(tower_problem(vision.model_type))
        if model.encoder.image_size != vision.image_size:
            problems.append(f"encoder image_size {model.encoder.image_size}: LLaVA runs the tower at its own "
                            f"{vision.image_size} px")
        if model.encoder.preprocessing.output_size is None:
            problems.append("image preprocessing without a fixed output size")
    problems += _bridge_problems(model)
    if cfg.tiling is not None:
        problems.append("tiling: LLaVA-1.5 takes one view per image, not a global view and tiles")
    if cfg.image_layout != "raster":
        problems.append(f"image_layout {cfg.image_layout!r}: LLaVA puts an image's tokens in one plain run ('raster')")
    if cfg.system_prompt is not None and not ChatTemplate(model.tokenizer).accepts_system:
        problems.append("system_prompt with a chat template that takes no system turn")
    return problems


def _bridge_problems(model: VisionLanguageModel) -> list[str]:
    name, bridge = model.config.bridge.name, model.bridge
    if name == "linear":
        if 2 * bridge.vision_dim > bridge.lm_dim:
            return [f"bridge 'linear' from width {bridge.vision_dim} to {bridge.lm_dim}: LLaVA's projector writes it "
                    f"exactly only when the LM is at least twice as wide as the tower (gelu(x) - gelu(-x) = x takes "
                    f"2 x {bridge.vision_dim} hidden units)"]
        return []
    if name != "mlp":
        return [f"bridge {name!r}: LLaVA's projector is linear -> GELU -> linear; only the 'linear' and 'mlp' "
                "bridges map onto it"]
    problems = []
    if not isinstance(bridge.norm, nn.Identity):
        problems.append("bridge option norm = true (a LayerNorm before the projector)")
    if bridge.pos_dim:
        problems.append(f"bridge option pos_dim = {bridge.pos_dim} (grid position codes beside the features)")
    if bridge.upsample != 1:
        problems.append(f"bridge option upsample = {bridge.upsample} (several tokens per feature)")
    if bridge.fc1.out_features != bridge.lm_dim:
        problems.append(f"bridge option hidden = {bridge.fc1.out_features}: LLaVA's projector is as wide as the LM "
                        f"({bridge.lm_dim})")
    return problems


def export_llava(model: VisionLanguageModel, out: str | Path) -> Path:
    """Write ``model`` as a LLaVA folder in the LM's dtype; raise NotRepresentable naming what LLaVA cannot hold."""
    problems = export_problems(model)
    if problems:
        raise NotRepresentable(KEEPS_FORMAT, problems)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lm = model.merged_lm()
    dtype = next(lm.parameters()).dtype
    vision = model.encoder.vision_config
    image_id = model.image_token_id
    tensors, vocab = _lm_tensors(lm, image_id)
    tensors.update({f"model.vision_tower.vision_model.{k}": v for k, v in model.encoder.tower.state_dict().items()})
    tensors.update({f"model.multi_modal_projector.{k}": v for k, v in _projector(model).items()})
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    text_config = copy.deepcopy(lm.config)
    text_config.vocab_size = vocab
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text_config.to_dict(),
                         image_token_index=image_id, image_seq_length=model.tokens_per_image,
                         vision_feature_layer=model.encoder.feature_layer,
                         vision_feature_select_strategy=strategy_for(vision.model_type), projector_hidden_act="gelu",
                         multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.tie_word_embeddings))
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    config.save_pretrained(out)
    _generation_config(model, lm).save_pretrained(out)
    _processor(model, vision).save_pretrained(out)
    return out


def _lm_tensors(lm: nn.Module, image_id: int) -> tuple[dict[str, torch.Tensor], int]:
    """The text model under ``model.language_model.`` and the head, the vocabulary grown to hold ``image_id``."""
    decoder = lm.get_decoder()
    embed, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    embed_key = next(n for n, m in decoder.named_modules() if m is embed) + ".weight"
    state = {f"model.language_model.{k}": v for k, v in decoder.state_dict().items()}
    vocab = max(embed.weight.shape[0], image_id + 1)
    state[f"model.language_model.{embed_key}"] = _grown(embed.weight, vocab)
    state["lm_head.weight"] = _grown(head.weight, vocab).clone()  # its own storage, also when tied
    if getattr(head, "bias", None) is not None:
        state["lm_head.bias"] = _grown(head.bias[:, None], vocab)[:, 0]
    return state, vocab


def _grown(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``rows`` with mean rows appended up to ``n`` rows."""
    if rows.shape[0] >= n:
        return rows
    mean = rows.detach().float().mean(0, keepdim=True).to(rows.dtype)
    return torch.cat([rows.detach(), mean.expand(n - rows.shape[0], -1)])


def _projector(model: VisionLanguageModel) -> dict[str, torch.Tensor]:
    """linear_1 / linear_2 weights and biases computing the bridge."""
    bridge = model.bridge
    if model.config.bridge.name == "mlp":
        return {"linear_1.weight": bridge.fc1.weight, "linear_1.bias": bridge.fc1.bias,
                "linear_2.weight": bridge.fc2.weight, "linear_2.bias": bridge.fc2.bias}
    v, d = bridge.vision_dim, bridge.lm_dim
    w, b = bridge.proj.weight.detach(), bridge.proj.bias.detach()
    eye = torch.eye(v, dtype=w.dtype)
    w1 = torch.zeros(d, v, dtype=w.dtype)
    w1[:v], w1[v : 2 * v] = eye, -eye
    w2 = torch.zeros(d, d, dtype=w.dtype)
    w2[:, :v], w2[:, v : 2 * v] = w, -w
    return {"linear_1.weight": w1, "linear_1.bias": torch.zeros(d, dtype=w.dtype),
            "linear_2.weight": w2, "linear_2.bias": b.clone()}


def _generation_config(model: VisionLanguageModel, lm: nn.Module) -> GenerationConfig:
    """The LM's generation config, stopping where chiasm stops (the template's turn end included)."""
    gen = copy.deepcopy(getattr(lm, "generation_config", None) or GenerationConfig())
    gen.eos_token_id = stop_token_ids(lm, model.tokenizer)
    gen.pad_token_id = model.tokenizer.pad_token_id
    return gen


def image_processor(prep: ImagePreprocessing) -> Any:
    """transformers' image processor doing chiasm's steps (LLaVA's own where the image is padded to a square)."""
    size = {"height": prep.size[0], "width": prep.size[1]} if prep.resize == "exact" else \
        {"shortest_edge": prep.size[0]}
    crop = {"do_center_crop": prep.crop is not None}
    if prep.crop is not None:
        crop["crop_size"] = {"height": prep.crop[0], "width": prep.crop[1]}
    kwargs = dict(size=size, resample=int(RESAMPLE[prep.resample]), do_rescale=True, rescale_factor=prep.rescale,
                  do_normalize=True, image_mean=list(prep.mean), image_std=list(prep.std), do_convert_rgb=True, **crop)
    if prep.pad_to_square:
        return LlavaImageProcessorPil(do_pad=True, **kwargs)
    return CLIPImageProcessorPil(**kwargs)


def chat_template(model: VisionLanguageModel) -> str:
    """The model's chat template taking content parts, with its system prompt where a conversation has none."""
    chat = ChatTemplate(model.tokenizer)
    template = model.tokenizer.chat_template if chat.structured else accepting_parts(model.tokenizer.chat_template)
    prompt = model.config.system_prompt
    if prompt is None:
        return template
    content = json.dumps([{"type": "text", "text": prompt}] if chat.structured else prompt, ensure_ascii=False)
    return ("{%- if not messages or messages[0]['role'] != 'system' -%}"
            f"{{%- set messages = [{{'role': 'system', 'content': {content}}}] + messages -%}}"
            "{%- endif -%}" + template)


def _processor(model: VisionLanguageModel, vision: Any) -> LlavaProcessor:
    tokenizer = copy.deepcopy(model.tokenizer)
    if processor_adds_bos(tokenizer):  # chiasm's prompts have no BOS there: the processor must not add one
        tokenizer.add_bos_token = False
    template = chat_template(model)
    tokenizer.chat_template = template
    return LlavaProcessor(image_processor=image_processor(model.encoder.preprocessing), tokenizer=tokenizer,
                          patch_size=vision.patch_size, vision_feature_select_strategy=strategy_for(vision.model_type),
                          num_additional_image_tokens=LEADING_TOKENS[vision.model_type], chat_template=template,
                          image_token=IMAGE_TOKEN)
