"""Drive chiasm's web page in a real headless browser: the end-to-end test and the README's screenshot.

The browser is the system's chromium (Debian's ``chromium`` package, installed by
``scripts/setup.sh``), never one that a test tool downloads; playwright (the dev extra) only
drives it. The flags are what chromium needs on a machine without a display, a sandbox
namespace or a network: headless, no sandbox and no GPU, and none of its background
connections (update checks, sync), which a closed network would refuse many times at every
start. Every run gets a fresh, empty profile folder, so nothing carries over between runs.

:class:`WebPage` speaks in the page's own terms (upload, ask, wait for the explainer), reading
what a person would see: the streamed answer's text, the explainer's facts, its token list.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--disable-default-apps")


class PageError(RuntimeError):
    """The page showed an error message (the text is the message as shown)."""


def find_chromium() -> str | None:
    """The chromium to drive: ``$CHIASM_CHROMIUM``, else Debian's ``/usr/bin/chromium``, else one on PATH."""
    for candidate in (os.environ.get("CHIASM_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


@contextmanager
def browser_page(profile: Path, *, width: int = 1280, height: int = 900, timeout_s: float = 120) -> Iterator[Any]:
    """A playwright page in headless chromium with a fresh profile in ``profile`` (which must not exist yet)."""
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium found: install Debian's chromium (scripts/setup.sh --dev does, as root) "
                                "or set CHIASM_CHROMIUM to a chromium binary")
    if profile.exists():
        raise FileExistsError(f"{profile}: a browser profile must start empty; give a new folder")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=executable, headless=True, args=list(CHROMIUM_FLAGS),
            viewport={"width": width, "height": height})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(timeout_s * 1000)
            yield page
        finally:
            context.close()


@dataclass
class Explained:
    """What the explainer panel shows once it has rendered."""

    facts: str
    visual_tokens: list[str]
    heat: str  # "ROWSxCOLS" of the heat map drawn, or "none"
    answer_tokens: list[str]
    note: str


class WebPage:
    """chiasm's page at ``url`` in a playwright ``page``."""

    def __init__(self, page: Any, url: str):
        self.page = page
        self.url = url
        self.console_errors: list[str] = []
        page.on("pageerror", lambda exc: self.console_errors.append(str(exc)))

    def open(self) -> str:
        """Load the page; returns the model line in its header once the model list has answered."""
        self.page.goto(self.url)
        self.page.wait_for_function("document.getElementById('model-name').textContent !== 'connecting…'")
        return self.page.inner_text("#model-name")

    def upload(self, image: Path) -> str:
        """Choose ``image`` in the page's file input; returns the hint that names it."""
        self.page.set_input_files("#image-input", str(image))
        self.page.wait_for_function(
            "!document.getElementById('preview').hidden || !document.getElementById('error').hidden")
        self._raise_shown_error()
        return self.page.inner_text("#drop-hint")

    def ask(self, question: str, *, max_tokens: int | None = None) -> tuple[str, int]:
        """Ask and wait for the streamed answer: its text and the number of pieces it arrived in.

        Raises :class:`PageError` with the page's message when the page shows an error instead.
        """
        done = self.page.locator("#messages li.assistant[data-state=done]")
        before = done.count()
        if max_tokens is not None:
            self.page.fill("#max-tokens", str(max_tokens))
        self.page.fill("#question", question)
        self.page.evaluate("document.getElementById('error').hidden = true")
        self.page.click("#send")
        self.page.wait_for_function(
            "([n]) => document.querySelectorAll('#messages li.assistant[data-state=done]').length > n"
            " || !document.getElementById('error').hidden", arg=[before])
        self._raise_shown_error()
        answer = done.nth(before)
        return answer.locator(".text").inner_text(), int(answer.get_attribute("data-pieces") or 0)

    def explained(self) -> Explained:
        """Wait for the explainer panel of the last answer and read it."""
        self.page.wait_for_function("['ready', 'error'].includes(document.body.dataset.explain)")
        if self.page.evaluate("document.body.dataset.explain") == "error":
            raise PageError(self.page.inner_text("#explain-status"))
        return Explained(facts=self.page.inner_text("#facts"),
                         visual_tokens=self.page.locator(".vtoken").all_inner_texts(),
                         heat=self.page.get_attribute("#view", "data-heat") or "",
                         answer_tokens=self.page.locator(".atoken").all_inner_texts(),
                         note=self.page.inner_text("#attention-note"))

    def hover_image(self, fx: float, fy: float) -> str:
        """Move the pointer to the fractions ``(fx, fy)`` of the drawn image; returns the card shown."""
        box = self.page.locator("#view").bounding_box()
        self.page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
        self.page.wait_for_selector("#hover-card:not([hidden])")
        return self.page.inner_text("#hover-card")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def _raise_shown_error(self) -> None:
        if self.page.is_visible("#error"):
            raise PageError(self.page.inner_text("#error"))
