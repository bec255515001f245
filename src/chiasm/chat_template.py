"""The LM's chat template, asked what it does instead of assumed to be ChatML.

Templates differ in ways that break naive use. Some reject a system turn (Gemma: "System
role not supported"); some render a turn differently depending on what follows it (Qwen3
gives only the assistant turn after the last user message a think block), so rendering a
longer conversation does not extend the shorter one; each names its end-of-turn token
differently (``<|im_end|>``, ``<end_of_turn>``, ``<|eot_id|>``). Everything here is found
by rendering, never by token names:

- a system prompt the template drops or rejects is folded into the first user turn, the
  way Gemma 3's own template does it;
- assistant answers are located by rendering the conversation with marker answers: the
  text around the markers is the template's, so an answer's characters (and the turn
  closing the template writes after it) are known exactly, in one render of the whole
  conversation; a template that rewrites an answer (e.g. strips a think block from an
  earlier turn) is refused for that sample, by name;
- the generation prompt is the text the template writes before an answer, so generation
  continues exactly where training put the answers;
- the end-of-turn token is the special token the template writes right after an answer;
- a template that reads a message's content as a list of typed parts (the multimodal
  processors' templates, LLaVA's among them) gets parts (:mod:`chiasm.content_parts`) and
  writes the image token per image itself; each is then expanded to the image's tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cached_property

from jinja2 import TemplateError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from chiasm.content_parts import IMAGE_PART, to_parts
from chiasm.data.sample import IMAGE_PLACEHOLDER
from chiasm.tokens import IMAGE_TOKEN

Message = dict[str, str]
_MARK = "@@chiasm-answer-{}@@"


def _shared_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = min(len(a), len(b))
    return next((k for k in range(n) if a[k] != b[k]), n)


def _expand(text: str, placeholder: str, image_text: str | list[str], texts: Iterator[str] | None) -> str:
    """``text`` with each ``placeholder`` replaced: by ``image_text``, or by the next of ``texts``."""
    if texts is None:
        return text.replace(placeholder, image_text)  # type: ignore[arg-type]
    pieces = text.split(placeholder)
    out = [pieces[0]]
    for piece in pieces[1:]:
        try:
            out.append(next(texts))
        except StopIteration:
            raise TemplateProblem(f"more {placeholder} placeholders than images") from None
        out.append(piece)
    return "".join(out)


class TemplateProblem(ValueError):
    """A conversation the chat template cannot render in a way answers can be located in."""


class ChatTemplate:
    """Rendering helpers for one tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, image_text: str | list[str] | None = None):
        """``image_text``: what each ``<image>`` placeholder becomes (the image's tokens); a list gives
        the n-th placeholder of the conversation its own text (tiled images of different sizes);
        None keeps it."""
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template; chiasm needs an instruct/chat LM")
        self.tok = tokenizer
        self.image_text = image_text

    def _apply(self, msgs: list[dict], generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        except TemplateError as exc:  # e.g. roles that do not alternate: a problem of this conversation
            raise TemplateProblem(f"the chat template refuses this conversation: {exc}") from None

    @cached_property
    def structured(self) -> bool:
        """Whether the template reads a message's content as a list of typed parts, not as a string."""
        probe = "chiasm content probe"
        try:
            if probe in self._apply([{"role": "user", "content": probe}], False):
                return False
            return probe in self._apply([{"role": "user", "content": [{"type": "text", "text": probe}]}], False)
        except (TemplateProblem, TypeError, AttributeError):
            return False

    def render(self, msgs: list[Message], *, generation_prompt: bool = False) -> str:
        """The template's text for ``msgs`` (string contents), with every image placeholder expanded."""
        if not self.structured:
            if self.image_text is not None:
                texts = iter(self.image_text) if isinstance(self.image_text, list) else None
                msgs = [{**m, "content": _expand(m["content"], IMAGE_PLACEHOLDER, self.image_text, texts)}
                        for m in msgs]
            return self._apply(msgs, generation_prompt)
        parted = [{**m, "content": to_parts(m["content"])} for m in msgs]
        text = self._apply(parted, generation_prompt)
        images = sum(p == IMAGE_PART for m in parted for p in m["content"])
        if text.count(IMAGE_TOKEN) != images:
            raise TemplateProblem(f"the chat template wrote {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} for {images} "
                                  f"image part(s); chiasm needs one {IMAGE_TOKEN} per image")
        if self.image_text is None:
            return text
        texts = iter(self.image_text) if isinstance(self.image_text, list) else None
        return _expand(text, IMAGE_TOKEN, self.image_text, texts)

    def with_image_texts(self, texts: list[str]) -> ChatTemplate:
        """This template with one text per placeholder, in order (what it found out about the template kept)."""
        out = copy.copy(self)
        out.image_text = list(texts)
        return out

    @cached_property
    def accepts_system(self) -> bool:
        """Whether a system turn renders (and is not silently dropped)."""
        probe = "chiasm system probe"
        try:
            text = self.render([{"role": "system", "content": probe}, {"role": "user", "content": "hi"}])
        except TemplateProblem:
            return False
        return probe in text

    def fit(self, msgs: list[Message]) -> list[Message]:
        """``msgs`` as this template takes them: system turns folded into the first user turn if needed."""
        if self.accepts_system or not any(m["role"] == "system" for m in msgs):
            return msgs
        systems = [m["content"] for m in msgs if m["role"] == "system"]
        rest = [dict(m) for m in msgs if m["role"] != "system"]
        first = next((i for i, m in enumerate(rest) if m["role"] == "user"), None)
        if first is None:
            raise TemplateProblem("the chat template takes no system turn and there is no user turn to fold it into")
        rest[first]["content"] = "\n\n".join([*systems, rest[first]["content"]])
        return rest

    def _marked(self, msgs: list[Message]) -> tuple[list[Message], dict[int, str]]:
        marks = {i: _MARK.format(i) for i, m in enumerate(msgs) if m["role"] == "assistant"}
        return [{**m, "content": marks[i]} if i in marks else m for i, m in enumerate(msgs)], marks

    def answer_spans(self, msgs: list[Message]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and, per assistant turn, the characters of its answer and turn closing."""
        marked, marks = self._marked(msgs)
        text_marked = self.render(marked)
        pieces, spans, pos, length = [], [], 0, 0
        for n, (i, mark) in enumerate(marks.items(), start=1):
            at = text_marked.find(mark, pos)
            if at < 0 or text_marked.count(mark) != 1:
                raise TemplateProblem(f"the chat template drops or repeats assistant turn {n}")
            pieces.append(text_marked[pos:at])
            start = length + at - pos
            answer = msgs[i]["content"]
            pieces.append(answer)
            pos = at + len(mark)
            length = start + len(answer)
            # The turn closing: what the template writes after the answer when the turn is the last one,
            # as far as the whole conversation agrees (the next turn's opening is not part of it).
            closing = self.render(marked[: i + 1]).partition(mark)[2]
            spans.append((start, length + _shared_prefix(closing, text_marked[pos:])))
        pieces.append(text_marked[pos:])
        text = self.render(msgs)
        if "".join(pieces) != text:
            stripped = [{**m, "content": m["content"].strip()} if m["role"] == "assistant" else m for m in msgs]
            if stripped != msgs:  # a template that trims answers (Gemma): train on the trimmed answer
                return self.answer_spans(stripped)
            rebuilt = "".join(pieces)
            k = _shared_prefix(rebuilt, text)
            n = next((n for n, (_, end) in enumerate(spans, start=1) if end > k), len(spans))
            i = list(marks)[n - 1]
            raise TemplateProblem(f"the chat template rewrites assistant turn {n} (rendered differently from its "
                                  f"text), so its tokens cannot be located for the labels: {msgs[i]['content']!r}")
        return text, spans

    def prompt_text(self, msgs: list[Message]) -> str:
        """The conversation so far and the text the template writes before an assistant answer.

        Where the template's own generation prompt is that text less trailing whitespace (LLaVA's
        ``ASSISTANT:`` before ``ASSISTANT: answer``), the generation prompt is taken: tokenizers
        that merge a space into the word after it put that space in the answer's first token in
        training, so a prompt ending in a lone space token would be one training never showed.
        """
        mark = _MARK.format("next")
        text = self.render([*msgs, {"role": "assistant", "content": mark}])
        if text.count(mark) != 1:
            raise TemplateProblem("the chat template drops or repeats the assistant turn to be generated")
        before = text.split(mark, 1)[0]
        own = self.render(msgs, generation_prompt=True)
        if before != own and before.startswith(own) and not before[len(own):].strip() and own != self.render(msgs):
            return own
        return before

    def tokenize(self, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
        """Token ids of ``text`` and, per token, whether it overlaps one of ``spans``."""
        if self.tok.is_fast:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            inside = [any(s < b and e > a for a, b in spans) for s, e in enc["offset_mapping"]]
            return list(enc["input_ids"]), inside
        # No character offsets: tokenise the pieces between span borders one by one.
        ids: list[int] = []
        inside = []
        pos = 0
        for a, b in [*spans, (len(text), len(text))]:
            for piece, flag in ((text[pos:a], False), (text[a:b], True)):
                if piece:
                    part = self.tok(piece, add_special_tokens=False)["input_ids"]
                    ids += part
                    inside += [flag] * len(part)
            pos = b
        return ids, inside

    def end_of_turn_id(self) -> int | None:
        """The special token the template writes right after an assistant answer, if any."""
        mark = _MARK.format(0)
        try:
            text = self.render(self.fit([{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]))
        except TemplateProblem:
            return None
        if mark not in text:
            return None
        special = set(self.tok.all_special_ids) | {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        for i in self.tok(text.split(mark, 1)[1], add_special_tokens=False)["input_ids"]:
            if i in special:
                return int(i)
            if self.tok.decode([i]).strip():
                return None  # text before any special token: the turn ends some other way
        return None


def stop_token_ids(lm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids greedy generation stops on: the LM's generation config, the tokenizer's EOS, the template's turn end."""
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids = list(eos) if isinstance(eos, list | tuple) else [eos]
    ids.append(tokenizer.eos_token_id)
    if tokenizer.chat_template is not None:
        ids.append(ChatTemplate(tokenizer).end_of_turn_id())
    return sorted({int(i) for i in ids if isinstance(i, int) and i >= 0})
