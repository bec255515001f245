"""How the model sees an image, computed from the model itself (``POST /v1/explain``, the web page).

Three views, each read off the real data path of :class:`~chiasm.model.VisionLanguageModel`:

* **the grid**: the cells of the encoder's feature grid (a ViT's patches, a CNN's feature map),
  drawn back onto the uploaded image through the inverse of the preprocessing
  (``chiasm.explain_geometry``), so a padded or centre-cropped image shows where each cell
  really looked;
* **the visual tokens**: what the bridge puts into the LM's sequence, each with the LM words
  whose *input* embeddings are nearest by cosine (the LM reads visual tokens through the same
  first layer as words, so this is the closest reading of a token "as text"), and, when the
  bridge keeps a spatial layout (``Bridge.token_grid``), the part of the image it comes from;
  learned-query bridges (resamplers, Q-Former) mix the whole image into every token and say so;
* **where the answer looked**: the LM's self-attention from the positions that produce the
  answer's tokens (the last prompt position predicts the first answer token, each answer token
  the next) to the image-token positions, averaged over all heads and the last layers
  (``last_layers``, by default the upper half, where attention to image tokens is read in
  LLaVA-style probing; the first layers attend mostly to nearby text). Each attention row sums
  to 1 over the whole sequence, so the image share of a row is the part of that step's
  attention spent on the image. The per-token values go onto the bridge's token grid and from
  there, area-weighted (the total kept), onto the encoder's grid: the heat map has the grid's size.

In-LM bridges: a visual expert still puts one token per cell into the sequence (through its
adapter) and runs them through their own projections inside the shared self-attention, so all
three views exist. Gated cross-attention puts one learned marker per image into the sequence and
reads the image through cross-attention layers to resampled latents with no spatial layout: the
grid and the marker are shown, the heat map is not, and the result says why.

The attention weights need the LM's eager attention (SDPA and flash kernels never form them):
the LM is switched to it for this one forward pass and switched back; a generation running at
the same time in another thread computes the same function with the other kernel meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedModel

from chiasm.chat import check_question
from chiasm.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from chiasm.explain_geometry import Geometry, cell_boxes, geometry, resample_grid
from chiasm.model import VisionLanguageModel

# Vocabulary rows compared with the visual tokens at a time: bounds the float32 copy of the table.
_CHUNK = 16384


def explain(model: VisionLanguageModel, image: Image.Image, question: str, *, answer: str | None = None,
            top_words: int = 3, last_layers: int | None = None, max_new_tokens: int = 64) -> dict:
    """JSON-serialisable: how the model sees ``image`` for ``question`` (see the module docstring).

    The answer is generated greedily when ``answer`` is None, else the given answer (the one a
    chat showed, say) is read as if the model had written it; an empty one explains the step
    that ended the turn. ``last_layers``: how many of the LM's last layers the
    attention is averaged over (default: the upper half).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"explain needs a PIL image, got {type(image).__name__}")
    if top_words < 1:
        raise ValueError(f"top_words must be at least 1, got {top_words}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_question(question, 1)
    if model.config.tiling is not None:
        # The views (global + tiles) would each need their own grid, cells and heat map on the image.
        raise ValueError("explain shows one view per image; this model tiles its images (model.tiling): "
                         "load it with tiling switched off to explain its global view, or chat with it instead")
    if IMAGE_PLACEHOLDER not in question:
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    image = image.convert("RGB")
    grid = model.encoder.grid()
    token_grid = model.bridge.token_grid(grid)
    geo = geometry(model.encoder.preprocessing, *image.size)
    modes = {m: m.training for m in model.modules()}  # restored as they were (a trainer keeps frozen parts in eval)
    model.eval()
    try:
        with torch.no_grad():
            features = model.encode_images(model.processor.preprocess(image)[None].to(model.device))
            visual = model.visual_tokens(features)[0]
            prompt = _prompt_ids(model, question)
            answer_ids = _answer_ids(model, prompt, features, answer, max_new_tokens)
            attention = _answer_attention(model, prompt, answer_ids, features, last_layers, token_grid, grid)
            tokens = _visual_tokens(model, visual, top_words, token_grid, geo)
    finally:
        for m, training in modes.items():
            m.training = training
    return {
        "model": {"encoder": model.config.encoder.name, "bridge": model.config.bridge.name,
                  "lm": type(model.base_lm).__name__, "image_layout": model.config.image_layout},
        "image": {"width": image.width, "height": image.height},
        "encoder": {"grid_kind": model.encoder.grid_kind, "grid": list(grid), "input_size": list(geo.input_size),
                    "cells": cell_boxes(geo, grid)},
        "bridge": _bridge_summary(model, token_grid),
        "tokens": tokens,
        "word_norm": _mean_word_norm(model),
        "question": question,
        "answer": {"text": model.tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                   "generated": answer is None, "token_ids": answer_ids,
                   "tokens": [model.tokenizer.decode([t]) for t in answer_ids]},
        "attention": attention,
    }


def nearest_words(vectors: torch.Tensor, table: torch.Tensor, k: int,
                  allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` rows of ``table`` by cosine with each of ``vectors``: ``(ids, cosines)``, each ``(n, k)``.

    ``allowed`` (bool per row) leaves out rows that are no words (special tokens, padding rows
    of an embedding table larger than the tokenizer). The table is read in chunks, in float32.
    """
    v = F.normalize(vectors.float(), dim=-1)
    n_rows = table.shape[0]
    best_cos = torch.full((v.shape[0], 0), -float("inf"), device=v.device)
    best_ids = torch.zeros((v.shape[0], 0), dtype=torch.long, device=v.device)
    for start in range(0, n_rows, _CHUNK):
        rows = F.normalize(table[start:start + _CHUNK].to(v.device).float(), dim=-1)
        cos = v @ rows.T
        if allowed is not None:
            cos = cos.masked_fill(~allowed[start:start + _CHUNK].to(v.device), -float("inf"))
        ids = torch.arange(start, start + rows.shape[0], device=v.device).expand_as(cos)
        best_cos, pick = torch.cat([best_cos, cos], 1).topk(min(k, best_cos.shape[1] + cos.shape[1]), dim=1)
        best_ids = torch.cat([best_ids, ids], 1).gather(1, pick)
    return best_ids, best_cos


def word_rows(model: VisionLanguageModel) -> torch.Tensor:
    """Which rows of the LM's input embedding table are words: inside the tokenizer, not special."""
    table = model.lm.get_input_embeddings().weight
    allowed = torch.zeros(table.shape[0], dtype=torch.bool)
    allowed[:min(len(model.tokenizer), table.shape[0])] = True
    for i in [*model.tokenizer.all_special_ids, model.image_token_id]:
        if 0 <= i < table.shape[0]:
            allowed[i] = False
    return allowed


def _prompt_ids(model: VisionLanguageModel, question: str) -> list[int]:
    # The path is never opened: the prompt needs only the number of images.
    sample = Sample(id="explain", conversations=[Turn("human", question)], images=[Path("<uploaded image>")],
                    source="<explain>")
    return list(model.processor.conversation.encode_prompt(sample).input_ids)


def _answer_ids(model: VisionLanguageModel, prompt: list[int], features: torch.Tensor, answer: str | None,
                max_new_tokens: int) -> list[int]:
    if answer is not None:  # "" too: a model may answer nothing, and the end of its turn is then explained
        return list(model.tokenizer(answer, add_special_tokens=False).input_ids)
    ids = torch.tensor([prompt], device=model.device)
    return model.generate(ids, torch.ones_like(ids), features=features, max_new_tokens=max_new_tokens)[0]


@contextmanager
def eager_attention(lm: PreTrainedModel) -> Iterator[None]:
    """Run ``lm`` with eager attention, which forms the attention weights, and restore its kernel after."""
    before = lm.config._attn_implementation
    if before == "eager":
        yield
        return
    lm.set_attn_implementation("eager")
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def _answer_attention(model: VisionLanguageModel, prompt: list[int], answer_ids: list[int], features: torch.Tensor,
                      last_layers: int | None, token_grid: tuple[int, int] | None, grid: tuple[int, int]) -> dict:
    seq = torch.tensor([prompt + answer_ids], device=model.device)
    embeds, layer_inputs = model.lm_inputs(seq, features)
    with eager_attention(model.base_lm):
        out = model.lm(inputs_embeds=embeds, attention_mask=torch.ones_like(seq), output_attentions=True,
                       use_cache=False, **layer_inputs)
    if not out.attentions:
        raise RuntimeError(f"{type(model.base_lm).__name__} returned no attention weights under eager attention")
    n_layers = len(out.attentions)
    k = n_layers - n_layers // 2 if last_layers is None else last_layers
    if not 1 <= k <= n_layers:
        raise ValueError(f"last_layers must be between 1 and the LM's {n_layers} layers, got {k}")
    # Positions whose next-token prediction is an answer token (one position if the answer is empty).
    queries = list(range(len(prompt) - 1, len(prompt) - 1 + max(1, len(answer_ids))))
    chosen = torch.stack([a[0, :, queries, :].double() for a in out.attentions[n_layers - k:]])
    rows = chosen.mean(dim=(0, 1)).cpu()  # (answer tokens, sequence)
    is_image = (seq[0] == model.image_token_id).cpu()
    to_image = rows[:, is_image].numpy()  # sequence order of the image positions
    order = model.token_order
    if order is not None:  # back to the bridge's own (row-major) order
        bridge_order = np.empty_like(to_image)
        bridge_order[:, order] = to_image
        to_image = bridge_order
    result = {
        "available": True,
        "layers": list(range(n_layers - k, n_layers)), "heads": int(chosen.shape[1]),
        "row_sums": [round(float(s), 6) for s in rows.sum(-1)],
        "image_share": float(to_image.sum(-1).mean()),
        "token_attention": to_image.mean(0).tolist(),
        "per_token": [{"image_share": float(r.sum()), "token_attention": r.tolist()} for r in to_image],
        "heat_map": None, "note": None,
    }
    if model.bridge.in_lm and token_grid is None:
        result["note"] = (f"{model.config.bridge.name}: the sequence holds {model.tokens_per_image} learned marker "
                          "token(s) per image and the image is read through cross-attention layers inside the LM, "
                          "to resampled latents with no spatial layout: the share is the attention on the marker, "
                          "and there is no heat map over the image")
    elif token_grid is None:
        result["note"] = (f"{model.config.bridge.name}: every visual token mixes the whole image (no spatial layout), "
                          "so the attention is shown per token, not as a heat map over the image")
    else:
        if model.bridge.in_lm:
            result["note"] = (f"{model.config.bridge.name}: the image tokens pass through their own projections "
                              "inside the LM's layers; the attention shown is the shared self-attention over them")
        for entry, r in zip(result["per_token"], to_image, strict=True):
            entry["heat"] = resample_grid(r.reshape(token_grid), grid).tolist()
        result["heat_map"] = resample_grid(to_image.mean(0).reshape(token_grid), grid).tolist()
    return result


def _visual_tokens(model: VisionLanguageModel, visual: torch.Tensor, top_words: int,
                   token_grid: tuple[int, int] | None, geo: Geometry) -> list[dict]:
    table = model.lm.get_input_embeddings().weight.detach()
    ids, cos = nearest_words(visual, table, top_words, word_rows(model))
    boxes = cell_boxes(geo, token_grid) if token_grid is not None else None
    order = model.token_order or list(range(visual.shape[0]))
    position = {k: p for p, k in enumerate(order)}
    norms = visual.float().norm(dim=-1).tolist()
    tokens = []
    for k in range(visual.shape[0]):
        tok = {"index": k, "sequence_index": position[k], "norm": round(norms[k], 4),
               "nearest": [{"id": int(i), "token": model.tokenizer.convert_ids_to_tokens(int(i)),
                            "text": model.tokenizer.decode([int(i)]), "cosine": round(float(c), 4)}
                           for i, c in zip(ids[k].tolist(), cos[k].tolist(), strict=True)]}
        if boxes is not None:
            tok.update(row=boxes[k]["row"], col=boxes[k]["col"], box=boxes[k]["box"])
        tokens.append(tok)
    return tokens


def _bridge_summary(model: VisionLanguageModel, token_grid: tuple[int, int] | None) -> dict:
    name = model.config.bridge.name
    if token_grid is not None:
        note = f"{model.tokens_per_image} visual tokens on a {token_grid[0]} x {token_grid[1]} grid over the image"
    elif model.bridge.in_lm:
        note = (f"no spatial layout: {model.tokens_per_image} marker token(s) per image in the sequence; the image "
                "enters inside the LM's layers")
    else:
        note = f"no spatial layout: {model.tokens_per_image} learned queries, each reading the whole image"
    return {"name": name, "in_lm": model.bridge.in_lm, "tokens_per_image": model.tokens_per_image,
            "spatial": token_grid is not None, "token_grid": list(token_grid) if token_grid else None, "note": note}


def _mean_word_norm(model: VisionLanguageModel) -> float:
    """Mean norm of the word embeddings: visual tokens far larger than words are read by size, not as words."""
    table = model.lm.get_input_embeddings().weight.detach()
    allowed = word_rows(model)
    norms = [table[s:s + _CHUNK].float().norm(dim=-1)[allowed[s:s + _CHUNK].to(table.device)]
             for s in range(0, table.shape[0], _CHUNK)]
    return round(float(torch.cat(norms).mean()), 4)
