"""CTranslate2 Whisper (``model.bin`` + ``tokenizer.json``) -> transformers' WhisperForConditionalGeneration.

This inverts CTranslate2's own Whisper converter (``ctranslate2.converters.transformers.
WhisperLoader``): self-attention there is one fused Q/K/V linear, split back in three here
(Whisper's K projection has no bias: CTranslate2 stored zeros in its slot); cross-attention
is a Q linear and a fused K/V linear; the output projection is an alias of the token
embeddings (tied). The sizes come from the weights' shapes and the spec's ``num_heads``, the
special-token ids from the tokenizer, the suppressed tokens and alignment heads from the
CTranslate2 ``config.json``: nothing is guessed from a folder name.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from chiasm.errors import ModelFolderError
from chiasm.speech.ct2_format import CT2Model, read_ct2_model
from chiasm.speech.tokens import build_tokenizer, special_ids

log = logging.getLogger(__name__)


def _t(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32))


def _count_layers(m: CT2Model, side: str) -> int:
    n = 0
    while f"{side}/layer_{n}/ffn/linear_0/weight" in m:
        n += 1
    return n


def _linear(sd: dict, m: CT2Model, src: str, dst: str, *, bias: bool = True) -> None:
    sd[f"{dst}.weight"] = _t(m.get(f"{src}/weight"))
    if bias:
        sd[f"{dst}.bias"] = _t(m.get(f"{src}/bias"))


def _norm(sd: dict, m: CT2Model, src: str, dst: str) -> None:
    sd[f"{dst}.weight"] = _t(m.get(f"{src}/gamma"))
    sd[f"{dst}.bias"] = _t(m.get(f"{src}/beta"))


def _split_qkv(sd: dict, m: CT2Model, src: str, dst: str, d: int) -> None:
    w, b = _t(m.get(f"{src}/linear_0/weight")), _t(m.get(f"{src}/linear_0/bias"))
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        sd[f"{dst}.{name}.weight"] = w[i * d : (i + 1) * d].clone()
        if name != "k_proj":
            sd[f"{dst}.{name}.bias"] = b[i * d : (i + 1) * d].clone()
    _linear(sd, m, f"{src}/linear_1", f"{dst}.out_proj")


def _split_cross(sd: dict, m: CT2Model, src: str, dst: str, d: int) -> None:
    _linear(sd, m, f"{src}/linear_0", f"{dst}.q_proj")
    w, b = _t(m.get(f"{src}/linear_1/weight")), _t(m.get(f"{src}/linear_1/bias"))
    sd[f"{dst}.k_proj.weight"] = w[:d].clone()
    sd[f"{dst}.v_proj.weight"] = w[d:].clone()
    sd[f"{dst}.v_proj.bias"] = b[d:].clone()
    _linear(sd, m, f"{src}/linear_2", f"{dst}.out_proj")


def state_dict_from_ct2(m: CT2Model) -> tuple[dict[str, torch.Tensor], dict]:
    """The transformers state dict and the size fields of its WhisperConfig."""
    if m.spec != "WhisperSpec":
        raise ModelFolderError(f"a CTranslate2 {m.spec} is not a Whisper model (expected WhisperSpec)")
    d = int(m.get("encoder/conv1/weight").shape[0])
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        _linear(sd, m, f"encoder/{conv}", f"{enc}.{conv}")
    sd[f"{enc}.embed_positions.weight"] = _t(m.get("encoder/position_encodings/encodings"))
    n_enc, n_dec = _count_layers(m, "encoder"), _count_layers(m, "decoder")
    for i in range(n_enc):
        s, t = f"encoder/layer_{i}", f"{enc}.layers.{i}"
        _split_qkv(sd, m, f"{s}/self_attention", f"{t}.self_attn", d)
        _norm(sd, m, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        _linear(sd, m, f"{s}/ffn/linear_0", f"{t}.fc1")
        _linear(sd, m, f"{s}/ffn/linear_1", f"{t}.fc2")
        _norm(sd, m, f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
    _norm(sd, m, "encoder/layer_norm", f"{enc}.layer_norm")
    sd[f"{dec}.embed_tokens.weight"] = _t(m.get("decoder/embeddings/weight"))
    sd[f"{dec}.embed_positions.weight"] = _t(m.get("decoder/position_encodings/encodings"))
    for i in range(n_dec):
        s, t = f"decoder/layer_{i}", f"{dec}.layers.{i}"
        _split_qkv(sd, m, f"{s}/self_attention", f"{t}.self_attn", d)
        _norm(sd, m, f"{s}/self_attention/layer_norm", f"{t}.self_attn_layer_norm")
        _split_cross(sd, m, f"{s}/attention", f"{t}.encoder_attn", d)
        _norm(sd, m, f"{s}/attention/layer_norm", f"{t}.encoder_attn_layer_norm")
        _linear(sd, m, f"{s}/ffn/linear_0", f"{t}.fc1")
        _linear(sd, m, f"{s}/ffn/linear_1", f"{t}.fc2")
        _norm(sd, m, f"{s}/ffn/layer_norm", f"{t}.final_layer_norm")
    _norm(sd, m, "decoder/layer_norm", f"{dec}.layer_norm")
    tied = np.array_equal(m.get("decoder/projection/weight"), m.get("decoder/embeddings/weight"))
    if not tied:
        sd["proj_out.weight"] = _t(m.get("decoder/projection/weight"))
    sizes = {
        "vocab_size": int(m.get("decoder/embeddings/weight").shape[0]),
        "num_mel_bins": int(m.get("encoder/conv1/weight").shape[1]),
        "d_model": d,
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": int(m.get("encoder/num_heads")) if "encoder/num_heads" in m else d // 64,
        "decoder_attention_heads": int(m.get("decoder/num_heads")) if "decoder/num_heads" in m else d // 64,
        "encoder_ffn_dim": int(m.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        "decoder_ffn_dim": int(m.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        "max_source_positions": int(m.get("encoder/position_encodings/encodings").shape[0]),
        "max_target_positions": int(m.get("decoder/position_encodings/encodings").shape[0]),
        "tie_word_embeddings": bool(tied),
    }
    return sd, sizes


def _ct2_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise ModelFolderError(f"{path}: not valid JSON ({exc})") from None


def generation_config(ids: dict, ct2_cfg: dict, sizes: dict, multilingual: bool) -> GenerationConfig:
    """What transformers' Whisper ``generate`` reads: prompt tokens, suppression, languages and tasks."""
    gen = GenerationConfig(
        decoder_start_token_id=ids["sot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        max_length=sizes["max_target_positions"],
        suppress_tokens=list(ct2_cfg.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_cfg.get("suppress_ids_begin") or [220, ids["eot"]]),
    )
    gen.no_timestamps_token_id = ids["notimestamps"]
    gen.prev_sot_token_id = ids["startofprev"]
    gen.max_initial_timestamp_index = 50
    gen.is_multilingual = multilingual
    gen.return_timestamps = False
    if ct2_cfg.get("alignment_heads"):
        gen.alignment_heads = [list(h) for h in ct2_cfg["alignment_heads"]]
    if multilingual:
        gen.lang_to_id = dict(ids["languages"])
        gen.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    return gen


def convert_ct2_folder(folder: str | Path) -> tuple[WhisperForConditionalGeneration, object, WhisperFeatureExtractor]:
    """Model, tokenizer and feature extractor from a CTranslate2 Whisper folder (model.bin, tokenizer.json)."""
    folder = Path(folder)
    m = read_ct2_model(folder / "model.bin")
    sd, sizes = state_dict_from_ct2(m)
    if not (folder / "tokenizer.json").is_file():
        raise ModelFolderError(f"{folder}: no tokenizer.json beside model.bin (CTranslate2 Whisper folders carry one)")
    tokenizer = build_tokenizer(folder / "tokenizer.json")
    ids = special_ids(tokenizer)
    multilingual = sizes["vocab_size"] >= 51865
    ct2_cfg = _ct2_config(folder)
    config = WhisperConfig(
        **sizes,
        decoder_start_token_id=ids["sot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
        suppress_tokens=None, begin_suppress_tokens=None,  # the generation config holds them (one place)
    )
    model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (sizes["tie_word_embeddings"] and k == "proj_out.weight")]
    if missing or unexpected:
        raise ModelFolderError(f"{folder}: the CTranslate2 weights do not map onto Whisper "
                               f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if sizes["tie_word_embeddings"]:
        model.tie_weights()
    model.generation_config = generation_config(ids, ct2_cfg, sizes, multilingual)
    model.eval()
    fe = WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"])
    log.info("converted CTranslate2 Whisper from %s: d=%d, %d+%d layers, vocab %d", folder, sizes["d_model"],
             sizes["encoder_layers"], sizes["decoder_layers"], sizes["vocab_size"])
    return model, tokenizer, fe
