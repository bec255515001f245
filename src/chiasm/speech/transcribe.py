"""Greedy or beam transcription with a transformers Whisper, in batches, long audio in windows."""

from __future__ import annotations

import numpy as np
import torch

from chiasm.speech.audio import MAX_SECONDS, SAMPLE_RATE, chunks
from chiasm.speech.loader import Whisper
from chiasm.speech.tokens import decoder_prompt, is_multilingual, language_code

CHUNK_OVERLAP_S = 1.0  # seconds shared by consecutive 30 s windows of a long recording


def features(w: Whisper, audios: list[np.ndarray]) -> torch.Tensor:
    """Log-mel features (B, 80, 3000), each clip padded to Whisper's 30 s window."""
    out = w.features(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    return out.to(w.model.device, w.model.dtype)


def generate_ids(w: Whisper, feats: torch.Tensor, *, language: str | None = None, task: str = "transcribe",
                 num_beams: int = 1, max_new_tokens: int = 200) -> list[list[int]]:
    """The text tokens (prompt and end token removed) for each row of ``feats``."""
    prompt = decoder_prompt(w.tokenizer, language, task)  # refuses a language the model has no token for
    limit = min(max_new_tokens, w.model.config.max_target_positions - len(prompt))
    # transformers' Whisper generate builds the prompt itself from language and task (a prompt
    # passed as decoder_input_ids is taken as text after its own start tokens).
    lang_task = {"language": language, "task": task} if is_multilingual(w.tokenizer) else {}
    with torch.no_grad():
        out = w.model.generate(feats, num_beams=num_beams, do_sample=False, max_new_tokens=limit,
                               return_timestamps=False, **lang_task)
    eot = w.tokenizer.convert_tokens_to_ids("<|endoftext|>")  # every special token's id is at or above it
    rows = []
    for row in out.tolist():
        row = row[len(prompt):] if row[: len(prompt)] == prompt else row
        rows.append([t for t in row if t < eot])
    return rows


def _join(parts: list[str], max_overlap: int = 8) -> str:
    """Join window transcripts, dropping words the overlap repeated at each seam."""
    words: list[str] = []
    for part in parts:
        new = part.split()
        best = 0
        for k in range(min(max_overlap, len(words), len(new)), 0, -1):
            if [x.lower().strip(".,!?") for x in words[-k:]] == [x.lower().strip(".,!?") for x in new[:k]]:
                best = k
                break
        words += new[best:]
    return " ".join(words)


def transcribe(w: Whisper, audios: list[np.ndarray], *, language: str | None = None, task: str = "transcribe",
               num_beams: int = 1, batch_size: int = 8, max_new_tokens: int = 200) -> list[str]:
    """One transcript per clip; clips over 30 s are cut into windows overlapping by ``CHUNK_OVERLAP_S``."""
    language = language_code(language)
    pieces: list[tuple[int, np.ndarray]] = []
    for i, audio in enumerate(audios):
        pieces += [(i, c) for c in chunks(audio, seconds=MAX_SECONDS, overlap=CHUNK_OVERLAP_S)]
    texts: list[list[str]] = [[] for _ in audios]
    for b in range(0, len(pieces), batch_size):
        batch = pieces[b : b + batch_size]
        ids = generate_ids(w, features(w, [c for _, c in batch]), language=language, task=task,
                           num_beams=num_beams, max_new_tokens=max_new_tokens)
        for (i, _), row in zip(batch, ids, strict=True):
            texts[i].append(w.tokenizer.decode(row, skip_special_tokens=True).strip())
    return [_join(t) for t in texts]
