"""A message's content as a string with ``<image>`` placeholders, or as a list of typed parts.

chiasm's conversations are strings in which ``<image>`` stands where an image goes (the LLaVA
data format). The chat templates of transformers' multimodal processors (LLaVA's among them)
read a message's content as a list of parts instead, ``{"type": "image"}`` and
``{"type": "text", "text": ...}``, and write the image token for each image part themselves.
The two conversions here are each other's inverse up to the whitespace around an image, which
such templates write themselves (LLaVA's writes ``<image>\\n``): one rule, used by the chat
template (string -> parts) and by the exported template (parts -> string), so both directions
agree on it.
"""

from __future__ import annotations

from typing import Any

from chiasm.data.sample import IMAGE_PLACEHOLDER

Part = dict[str, Any]
IMAGE_PART: Part = {"type": "image"}
PART_SEPARATOR = "\n"  # between the parts when a list becomes a string again


def to_parts(text: str) -> list[Part]:
    """``"<image>\\nWhat is it?"`` -> ``[image, text "What is it?"]``; whitespace next to an image is dropped."""
    pieces = text.split(IMAGE_PLACEHOLDER)
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append(dict(IMAGE_PART))
            piece = piece.lstrip()
        if i < len(pieces) - 1:
            piece = piece.rstrip()
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


# Jinja that turns list contents back into strings (images as the placeholder, parts joined by
# PART_SEPARATOR), put in front of a template that reads string contents only.
PARTS_TO_STRING = (
    "{%- set chiasm_ns = namespace(messages=[]) -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string -%}{%- set chiasm_text = m['content'] -%}"
    "{%- else -%}{%- set chiasm_parts = namespace(items=[]) -%}"
    "{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}{%- set chiasm_parts.items = chiasm_parts.items + ['" + IMAGE_PLACEHOLDER + "'] -%}"
    "{%- elif p['type'] == 'text' -%}{%- set chiasm_parts.items = chiasm_parts.items + [p['text']] -%}{%- endif -%}"
    "{%- endfor -%}{%- set chiasm_text = chiasm_parts.items | join(" + repr(PART_SEPARATOR) + ") -%}"
    "{%- endif -%}"
    "{%- set chiasm_ns.messages = chiasm_ns.messages + [{'role': m['role'], 'content': chiasm_text}] -%}"
    "{%- endfor -%}"
    "{%- set messages = chiasm_ns.messages -%}"
)


def accepting_parts(template: str) -> str:
    """``template`` (string contents) preceded by the conversion, so it also renders list contents."""
    return PARTS_TO_STRING + template
