"""Streamed text: whole characters only, stop strings held back and cut even across tokens."""

from __future__ import annotations

import pytest

from chiasm.generation.text import TextStream
from chiasm.testing import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


def _stream(tok, ids: list[int], stop: list[str] = ()) -> tuple[list[str], bool, str]:
    s = TextStream(tok, stop)
    pieces = []
    for i in ids:
        piece, stopped = s.push(i)
        pieces.append(piece)
        if stopped:
            return pieces, True, ""
    return pieces, False, s.finish()


def test_multibyte_characters_are_never_split(tok) -> None:
    text = "héllo wörld, 日本語 ok 🙂!"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # the characters outside the corpus take several byte tokens each
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # so decoding token by token would break them
    pieces, stopped, rest = _stream(tok, ids)
    assert not stopped and rest == ""
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert "".join(pieces[:-1]) != text  # released as it came, not only at the end


def test_broken_bytes_at_the_end_are_released_on_finish(tok) -> None:
    ids = tok("ab 日", add_special_tokens=False)["input_ids"][:-1]  # the last character cut mid-way
    pieces, _, rest = _stream(tok, ids)
    assert "".join(pieces) == "ab "
    assert "".join(pieces) + rest == tok.decode(ids)


def test_stop_string_spanning_tokens_is_cut_and_held_back(tok) -> None:
    text = "the quick brown fox jumps"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert not any("k br" in tok.decode([i]) for i in ids)  # the stop string spans tokens
    pieces, stopped, _ = _stream(tok, ids, ["k br", "zzz"])
    assert stopped
    assert "".join(pieces) == "the quic"  # the "k" was held back until " br" showed it starts the stop string


def test_a_partial_stop_string_that_does_not_complete_is_released(tok) -> None:
    ids = tok("the quick brown", add_special_tokens=False)["input_ids"]
    pieces, stopped, rest = _stream(tok, ids, ["brownie"])
    assert not stopped
    assert "brown" not in "".join(pieces)  # held: it might have become "brownie"
    assert "".join(pieces) + rest == "the quick brown"


def test_stop_string_at_the_very_start(tok) -> None:
    ids = tok("the quick", add_special_tokens=False)["input_ids"]
    pieces, stopped, _ = _stream(tok, ids, ["the"])
    assert stopped and "".join(pieces) == ""
