"""WER and CER after Whisper's text normalisers, computed with jiwer; word-level diffs for reports.

English uses OpenAI's ``EnglishTextNormalizer`` (numbers, spellings, contractions, fillers);
every other language the ``BasicTextNormalizer`` (case, punctuation, bracketed noise), as the
Whisper paper scored its multilingual results. Scores are corpus-level: total errors over
total reference words, not a mean of per-clip rates.
"""

from __future__ import annotations

from functools import cache

import jiwer


@cache
def _english():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@cache
def _basic():
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def normalise(text: str, language: str | None) -> str:
    """Whisper's English normaliser for English (or unknown), the basic one for any other language."""
    norm = _english() if language in (None, "en") else _basic()
    return " ".join(norm(text).split())


def error_rates(refs: list[str], hyps: list[str], language: str | None) -> dict:
    """Corpus WER and CER (normalised text) and the counts behind them."""
    r = [normalise(t, language) for t in refs]
    h = [normalise(t, language) for t in hyps]
    keep = [i for i, t in enumerate(r) if t]  # a reference that normalises to nothing has no words to score
    r, h = [r[i] for i in keep], [h[i] for i in keep]
    if not r:
        return {"wer": None, "cer": None, "words": 0, "n": 0}
    words = jiwer.process_words(r, h)
    chars = jiwer.process_characters(r, h)
    n_words = sum(len(t.split()) for t in r)
    return {"wer": words.wer, "cer": chars.cer, "words": n_words, "n": len(r),
            "substitutions": words.substitutions, "deletions": words.deletions, "insertions": words.insertions}


def word_diff(ref: str, hyp: str, language: str | None) -> list[tuple[str, str, str]]:
    """(op, reference words, hypothesis words) per aligned chunk: op is equal/substitute/delete/insert."""
    r, h = normalise(ref, language), normalise(hyp, language)
    if not r and not h:
        return []
    if not r:
        return [("insert", "", h)]
    out = jiwer.process_words(r, h if h else "")
    rw, hw = r.split(), h.split()
    diff = []
    for chunk in out.alignments[0]:
        diff.append((chunk.type, " ".join(rw[chunk.ref_start_idx : chunk.ref_end_idx]),
                     " ".join(hw[chunk.hyp_start_idx : chunk.hyp_end_idx])))
    return diff
