"""The web page end to end: the real server on loopback, Debian's chromium driven by playwright.

The page is loaded from the server, an image is uploaded through its file input, questions are
asked and the answers are read off the page as they streamed in; they must equal what the
server answers the same conversation without streaming (greedy decoding). The explainer panel
must show the encoder grid, the visual tokens with the words ``/v1/explain`` gives and the heat
map; a refused request must show the server's message and leave the conversation as it was.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from pathlib import Path

import pytest

from chiasm.browser import PageError, WebPage, browser_page, find_chromium

pytestmark = pytest.mark.skipif(
    find_chromium() is None,
    reason="chromium is not installed (scripts/setup.sh --dev installs Debian's chromium as root); this test drives it")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def user(question: str, image_url: str | None = None) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


def test_page_streams_answers_and_shows_how_the_model_sees(saved_model: Path, image: Path, tmp_path: Path) -> None:
    from chiasm.serve.app import create_app
    from chiasm.serve.background import BackgroundServer
    from chiasm.serve.settings import ServeSettings

    url = f"data:image/png;base64,{base64.b64encode(image.read_bytes()).decode()}"
    with BackgroundServer(create_app(saved_model, ServeSettings(model_name="tiny"))) as server, \
            browser_page(tmp_path / "profile") as page:
        web = WebPage(page, server.url + "/")
        assert web.open() == "model: tiny"
        assert web.upload(image).startswith(f"{image.name} (64 × 64)")

        # Two turns, each read off the page as streamed, each equal to the server's own whole answer.
        history: list[dict] = []
        for question in ("What colour is the circle?", "Where is it?"):
            shown, pieces = web.ask(question, max_tokens=8)
            history.append(user(question, url if not history else None))
            whole = post(server.url + "/v1/chat/completions", {"model": "tiny", "messages": history, "max_tokens": 8,
                                                                   "temperature": 0})
            assert shown == whole["choices"][0]["message"]["content"]
            assert 1 < pieces <= whole["usage"]["completion_tokens"]  # it arrived piece by piece
            history.append({"role": "assistant", "content": shown})
        assert page.locator("#messages li").count() == 4

        seen = web.explained()
        assert "tiny-vit: 4 × 4 patch grid on a 64 × 64 px input" in seen.facts
        assert "mlp: 16 visual tokens on a 4 x 4 grid over the image" in seen.facts
        assert seen.heat == "4x4" and len(seen.visual_tokens) == 16
        reference = post(server.url + "/v1/explain", {"image": url, "question": "Where is it?", "answer": shown})
        for text, token in zip(seen.visual_tokens, reference["tokens"], strict=True):
            words = " ".join(json.dumps(w["text"] if w["text"] and "\ufffd" not in w["text"] else w["token"],
                                        ensure_ascii=False) for w in token["nearest"])
            assert text.startswith(f"#{token['index']} (row {token['row']}, col {token['col']}) {words}")
        assert len(seen.answer_tokens) == len(reference["answer"]["token_ids"])

        card = web.hover_image(0.1, 0.9)  # bottom-left cell, and the token drawn over it
        assert "patch grid cell row 3, col 0:" in card and "% of the attention" in card
        assert "visual token #12, position 12 in the sequence" in card and card.count("cos ") == 3
        web.screenshot(tmp_path / "web.png")
        assert (tmp_path / "web.png").stat().st_size > 10_000

        # A refused request shows the server's message; the conversation and the question stay.
        with pytest.raises(PageError, match=r"^Server error 400: 'max_tokens' is 100000, over this server's limit"):
            web.ask("And its size?", max_tokens=100000)
        assert page.locator("#messages li").count() == 4
        assert page.input_value("#question") == "And its size?"

        notes = tmp_path / "notes.png"
        notes.write_text("not a picture")
        with pytest.raises(PageError, match=r"^notes\.png is not an image this browser can read$"):
            web.upload(notes)
    assert web.console_errors == []
