"""Answer a question about an image with a saved model (``chiasm chat``)."""

from __future__ import annotations

from pathlib import Path

import torch

from chiasm.data.images import load_image
from chiasm.data.sample import IMAGE_PLACEHOLDER, Sample, Turn
from chiasm.model import VisionLanguageModel


@torch.no_grad()
def ask(model: VisionLanguageModel, question: str, images: list[Path], *, history: list[Turn] | None = None,
        max_new_tokens: int = 64) -> str:
    """One greedy answer. Images go where ``<image>`` stands, or before the question if absent."""
    check_question(question, len(images), history)
    for img in images:
        # Fail early, with the path, on a missing or corrupt file.
        load_image(Path(img), sample_id="chat", source="<chat>")
    text = question
    if images and IMAGE_PLACEHOLDER not in question and not any(IMAGE_PLACEHOLDER in t.text for t in history or []):
        text = "\n".join([IMAGE_PLACEHOLDER] * len(images) + [question])
    turns = [*(history or []), Turn("human", text)]
    sample = Sample(id="chat", conversations=turns, images=[Path(p) for p in images], source="<chat>")
    batch = model.processor([sample], for_generation=True).to(model.device)
    rows = model.generate(batch.input_ids, batch.attention_mask, pixels=batch.pixels, max_new_tokens=max_new_tokens)
    return model.tokenizer.decode(rows[0], skip_special_tokens=True).strip()


def check_question(question: str, n_images: int, history: list[Turn] | None = None) -> None:
    """Refuse an empty question, and ``<image>`` placeholders that do not match the images given.

    Either every image has its placeholder in the conversation or none has one (then they go
    before the question); any other count would fail later as a token mismatch, or silently
    leave an image out.
    """
    if not question.strip():
        raise ValueError("the question is empty; ask something, or leave the question out for an interactive chat")
    placed = sum(t.text.count(IMAGE_PLACEHOLDER) for t in [*(history or []), Turn("human", question)])
    if placed and placed != n_images:
        raise ValueError(f"the question holds {placed} {IMAGE_PLACEHOLDER} placeholder(s) but {n_images} image(s) "
                         f"were given; give one --image per {IMAGE_PLACEHOLDER}, or leave the placeholders out")


def interactive(model: VisionLanguageModel, images: list[Path]) -> None:
    """A small REPL: the images stay in the conversation, each line is a new question."""
    for img in images:
        load_image(Path(img))  # a missing image fails before the first question, not after it
    history: list[Turn] = []
    print("chiasm chat: empty line or Ctrl-D to quit")
    while True:
        try:
            q = input("you> ").strip()
        except EOFError:
            break
        if not q:
            break
        try:
            check_question(q, len(images), history)
        except ValueError as exc:  # the line, not the session, is wrong: say so and ask again
            print(f"error: {exc}")
            continue
        a = ask(model, q, images, history=history)
        if not history and images and IMAGE_PLACEHOLDER not in q:
            q = "\n".join([IMAGE_PLACEHOLDER] * len(images) + [q])
        history += [Turn("human", q), Turn("gpt", a)]
        print(f"model> {a}")
