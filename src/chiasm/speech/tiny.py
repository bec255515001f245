"""A tiny randomly initialised Whisper with a real Whisper tokenizer, for tests and quick runs.

The sizes are small enough that a training step takes milliseconds on a CPU; the tokenizer
is the packaged tiny.en's (English-only) or base's (multilingual), so prompts, labels and
language tokens are exactly those of the real models.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from chiasm.speech.loader import Whisper, packaged_ct2_folder
from chiasm.speech.tokens import build_tokenizer, is_multilingual, special_ids


def tiny_whisper(packaged: str = "tiny.en", *, d_model: int = 32, layers: int = 1, heads: int = 2,
                 seed: int = 0) -> Whisper:
    """A random Whisper of width ``d_model`` sharing the packaged model's tokenizer and special ids."""
    tok = build_tokenizer(packaged_ct2_folder(packaged) / "tokenizer.json")
    ids = special_ids(tok)
    multi = is_multilingual(tok)
    vocab = 51865 if multi else 51864
    torch.manual_seed(seed)
    config = WhisperConfig(vocab_size=vocab, num_mel_bins=80, d_model=d_model, encoder_layers=layers,
                           decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
                           encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model, max_target_positions=64,
                           decoder_start_token_id=ids["sot"], bos_token_id=ids["eot"], eos_token_id=ids["eot"],
                           pad_token_id=ids["eot"], suppress_tokens=None, begin_suppress_tokens=None)
    model = WhisperForConditionalGeneration(config).eval()
    gen = GenerationConfig(decoder_start_token_id=ids["sot"], eos_token_id=ids["eot"], pad_token_id=ids["eot"],
                           bos_token_id=ids["eot"], max_length=64, begin_suppress_tokens=[220, ids["eot"]])
    gen.no_timestamps_token_id = ids["notimestamps"]
    gen.is_multilingual = multi
    gen.return_timestamps = False
    if multi:
        gen.lang_to_id = dict(ids["languages"])
        gen.task_to_id = {"transcribe": ids["transcribe"], "translate": ids["translate"]}
    model.generation_config = gen
    return Whisper(model, tok, WhisperFeatureExtractor(feature_size=80), f"tiny-{packaged}")
