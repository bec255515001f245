"""Greedy or beam transcription with a transformers Whisper, in batches, long audio in windows."""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutput

from chiasm.speech.audio import MAX_SECONDS, SAMPLE_RATE, chunks
from chiasm.speech.loader import Whisper
from chiasm.speech.tokens import decoder_prompt, is_multilingual, language_code

CHUNK_OVERLAP_S = 1.0  # seconds shared by consecutive 30 s windows of a long recording


def features(w: Whisper, audios: list[np.ndarray]) -> torch.Tensor:
    """Log-mel features (B, 80, 3000), each clip padded to Whisper's 30 s window."""
    out = w.features(audios, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    return out.to(w.model.device, w.model.dtype)


class EncoderOutputs:
    """Whisper encoder outputs of clips already encoded, reused while the encoder is unchanged.

    The encoder reads a 30 s window whatever the clip's length, so it is most of a short clip's
    cost. Two users share this one cache: a fine-tuning run that leaves the encoder frozen
    encodes each training clip once for every epoch (kept as bf16 there, half the memory), and
    the evaluations before and after training score the same clips with the same encoder. Rows
    are keyed by a hash of the window's samples; :meth:`bind` drops them whenever a hash of the
    encoder's weights changes, so a model whose encoder trained never reads a stale row. Past
    ``max_bytes`` new rows are computed but not kept.
    """

    def __init__(self, max_bytes: int = 2 << 30, *, keep_dtype: torch.dtype | None = None,
                 bf16: bool = False) -> None:
        self.max_bytes = max_bytes
        self.keep_dtype = keep_dtype  # None: as the encoder gave them
        self.bf16 = bf16  # encode under bf16 autocast (training's precision)
        self.rows: dict[str, torch.Tensor] = {}
        self.weights: str | None = None

    def bind(self, w: Whisper) -> None:
        """Forget every row if ``w``'s encoder weights differ from those the rows were computed with."""
        h = hashlib.sha1()
        for name, t in w.model.model.encoder.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        if h.hexdigest() != self.weights:
            self.rows.clear()
            self.weights = h.hexdigest()

    def __call__(self, w: Whisper, windows: list[np.ndarray], encoder: torch.nn.Module | None = None) -> torch.Tensor:
        """``(len(windows), frames, d_model)``: kept rows reused, the others encoded as one batch.

        ``encoder``: the module to run (default ``w``'s own; a trainer passes the one under its
        adapters' wrapper).
        """
        keys = [hashlib.sha1(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest() for x in windows]
        todo = [i for i, k in enumerate(keys) if k not in self.rows]
        fresh: dict[str, torch.Tensor] = {}
        if todo:
            module = encoder if encoder is not None else w.model.model.encoder
            feats = features(w, [windows[i] for i in todo])
            with torch.no_grad(), torch.autocast(feats.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                out = module(feats).last_hidden_state
            if self.keep_dtype is not None:
                out = out.to(self.keep_dtype)
            used = sum(t.numel() * t.element_size() for t in self.rows.values())
            for i, row in zip(todo, out, strict=True):
                fresh[keys[i]] = row
                if used + row.numel() * row.element_size() <= self.max_bytes:
                    self.rows[keys[i]] = row
                    used += row.numel() * row.element_size()
        return torch.stack([self.rows.get(k, fresh.get(k)) for k in keys])


def generate_ids(w: Whisper, feats: torch.Tensor | None, *, language: str | None = None, task: str = "transcribe",
                 num_beams: int = 1, max_new_tokens: int = 200,
                 encoded: torch.Tensor | None = None) -> list[list[int]]:
    """The text tokens (prompt and end token removed) for each row of ``feats`` (or of the encoder
    outputs ``encoded``, given instead)."""
    prompt = decoder_prompt(w.tokenizer, language, task)  # refuses a language the model has no token for
    limit = min(max_new_tokens, w.model.config.max_target_positions - len(prompt))
    # transformers' Whisper generate builds the prompt itself from language and task (a prompt
    # passed as decoder_input_ids is taken as text after its own start tokens).
    lang_task = {"language": language, "task": task} if is_multilingual(w.tokenizer) else {}
    source = {"input_features": feats} if encoded is None else \
        {"encoder_outputs": BaseModelOutput(last_hidden_state=encoded)}
    with torch.no_grad():
        out = w.model.generate(**source, num_beams=num_beams, do_sample=False, max_new_tokens=limit,
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
               num_beams: int = 1, batch_size: int = 8, max_new_tokens: int = 200,
               encoded: EncoderOutputs | None = None) -> list[str]:
    """One transcript per clip; clips over 30 s are cut into windows overlapping by ``CHUNK_OVERLAP_S``.

    With ``encoded`` the windows' encoder outputs are looked up there (and kept) rather than recomputed.
    """
    language = language_code(language)
    pieces: list[tuple[int, np.ndarray]] = []
    for i, audio in enumerate(audios):
        pieces += [(i, c) for c in chunks(audio, seconds=MAX_SECONDS, overlap=CHUNK_OVERLAP_S)]
    texts: list[list[str]] = [[] for _ in audios]
    for b in range(0, len(pieces), batch_size):
        batch = pieces[b : b + batch_size]
        windows = [c for _, c in batch]
        ids = generate_ids(w, features(w, windows) if encoded is None else None, language=language, task=task,
                           num_beams=num_beams, max_new_tokens=max_new_tokens,
                           encoded=None if encoded is None else encoded(w, windows))
        for (i, _), row in zip(batch, ids, strict=True):
            texts[i].append(w.tokenizer.decode(row, skip_special_tokens=True).strip())
    return [_join(t) for t in texts]
