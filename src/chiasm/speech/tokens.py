"""Whisper's tokenizer from a bare ``tokenizer.json``, its special ids, and language names.

The decoder prompt is ``<|startoftranscript|> [<|lang|> <|task|>] <|notimestamps|>`` (the
bracketed part only for multilingual models); the ids are read from the tokenizer, since an
English-only vocabulary puts every special token one place lower than a multilingual one.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from transformers import WhisperTokenizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE


def english_spelling_file() -> str:
    """OpenAI's British -> American spelling table that Whisper's English normaliser reads."""
    return str(resources.files("whisper_normalizer").joinpath("normalizers/english.json"))


def build_tokenizer(tokenizer_json: str | Path) -> WhisperTokenizer:
    """A transformers WhisperTokenizer over the given ``tokenizer.json`` (with the spelling table)."""
    return WhisperTokenizer(tokenizer_file=str(tokenizer_json), normalizer_file=english_spelling_file())


def special_ids(tok: WhisperTokenizer) -> dict:
    """The ids of Whisper's control tokens and of every language token the vocabulary holds."""
    get = tok.convert_tokens_to_ids
    ids = {
        "eot": get("<|endoftext|>"), "sot": get("<|startoftranscript|>"), "translate": get("<|translate|>"),
        "transcribe": get("<|transcribe|>"), "startofprev": get("<|startofprev|>"),
        "notimestamps": get("<|notimestamps|>"),
    }
    unk = tok.unk_token_id
    langs = {}
    for code in LANGUAGES:
        i = get(f"<|{code}|>")
        if i is not None and i != unk:
            langs[f"<|{code}|>"] = i
    ids["languages"] = langs
    return ids


def language_code(language: str | None) -> str | None:
    """'german', 'German' or 'de' -> 'de'; None stays None; an unknown name is refused with the known ones."""
    if language is None:
        return None
    lang = language.strip().lower()
    if lang in LANGUAGES:
        return lang
    if lang in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[lang]
    raise ValueError(f"unknown language {language!r}; give a Whisper language code (en, de, es, ...) or name")


def is_multilingual(tok: WhisperTokenizer) -> bool:
    """Whether this is a multilingual vocabulary.

    An ``.en`` tokenizer lists language tokens too, but its model was never trained on them;
    its byte-pair vocabulary is one entry shorter (GPT-2's), so ``<|endoftext|>`` is 50256
    there and 50257 in the multilingual one.
    """
    return tok.convert_tokens_to_ids("<|endoftext|>") >= 50257


def decoder_prompt(tok: WhisperTokenizer, language: str | None, task: str = "transcribe") -> list[int]:
    """The decoder's start tokens for ``language``/``task``; an English-only model takes neither.

    A language other than English for an English-only model is refused: its tokens do not exist there.
    """
    ids = special_ids(tok)
    code = language_code(language)
    if not is_multilingual(tok):
        if code not in (None, "en"):
            raise ValueError(f"language {code!r}: this Whisper model is English-only (no language tokens)")
        if task != "transcribe":
            raise ValueError(f"task {task!r}: an English-only Whisper model only transcribes")
        return [ids["sot"], ids["notimestamps"]]
    if task not in ("transcribe", "translate"):
        raise ValueError(f"task {task!r}: Whisper knows 'transcribe' and 'translate'")
    out = [ids["sot"]]
    if code is not None:
        out.append(ids["languages"][f"<|{code}|>"])
    out += [ids[task], ids["notimestamps"]]
    return out
