"""Training wordings of the synthetic world's questions, drawn from a small grammar.

A model trained on one wording per question learns the wording: asked "Count the shapes in
this picture." instead of "How many objects are there?", it answered with a shape. Instruction
data in many words is how VLMs learn the task instead. Here each question type has a dozen
sentence frames, each frame's nouns drawn from synonym sets ("object", "shape", "thing", ...;
"image", "picture", ...), which gives a few hundred wordings per type.

The held-out wordings of :mod:`chiasm.synthetic.paraphrase` stay unseen: a frame whose
wording equals a held-out one once every synonym is replaced by its set's name is dropped
(:func:`training_frames`), so evaluation in other words asks in sentences that training never
used, not in the same sentence with another noun.
"""

from __future__ import annotations

import itertools
import random
import re
from functools import cache

from chiasm.synthetic.paraphrase import PARAPHRASES

# Synonym sets: a frame's {obj} is filled from OBJ, {objs} from OBJS, and so on.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "obj": ("object", "shape", "thing", "figure", "item"),
    "objs": ("objects", "shapes", "things", "figures", "items"),
    "img": ("image", "picture", "scene", "drawing"),
    "col": ("colour", "color"),
    "form": ("shape", "form"),
}

# Frames per template, in PARAPHRASES order; {cell}, {shape}, {colour} come from the question
# and {a} is "a" or "an" before the colour.
FRAMES: tuple[tuple[str, ...], ...] = (
    ("What {col} is the {obj} in the {cell}?", "What is the {col} of the {obj} in the {cell}?",
     "Name the {col} of the {obj} in the {cell}.", "Say the {col} of the {obj} in the {cell}.",
     "In the {cell}, what {col} is the {obj}?", "Identify the {col} of the {obj} in the {cell}.",
     "The {obj} in the {cell} is what {col}?", "Look at the {cell}: what {col} is the {obj} there?",
     "What {col} is the {obj} in the {cell} of the {img}?", "Which {col} is the {obj} in the {cell}?"),
    ("What {col} is the {shape}?", "What is the {col} of the {shape}?", "Name the {col} of the {shape}.",
     "Say the {col} of the {shape}.", "Identify the {col} of the {shape}.", "The {shape} is what {col}?",
     "Which {col} is the {shape}?", "What {col} is the {shape} in the {img}?",
     "In the {img}, what {col} is the {shape}?", "What {col} was used for the {shape}?"),
    ("What {form} is the {colour} {obj}?", "What is the {form} of the {colour} {obj}?",
     "Identify the {form} of the {colour} {obj}.", "Say the {form} of the {colour} {obj}.",
     "The {colour} {obj} is what {form}?", "What kind of {form} is the {colour} {obj}?",
     "What {form} does the {colour} {obj} have?", "In the {img}, what {form} is the {colour} {obj}?",
     "Which {form} is the {colour} {obj}?"),
    ("What {form} is the {obj} in the {cell}?", "What is the {form} of the {obj} in the {cell}?",
     "Identify the {form} of the {obj} in the {cell}.", "Say the {form} of the {obj} in the {cell}.",
     "In the {cell}, what {form} is the {obj}?", "The {obj} in the {cell} is what {form}?",
     "What kind of {form} is in the {cell}?", "What {form} do you see in the {cell}?",
     "Look at the {cell}: what {form} is there?"),
    ("How many {objs} are there?", "How many {objs} are in the {img}?", "How many {objs} are there in the {img}?",
     "How many {objs} does the {img} contain?", "How many {objs} are shown?", "How many {objs} do you see?",
     "What is the count of {objs} in the {img}?", "Number of {objs} in the {img}?",
     "Give the number of {objs}.", "Say how many {objs} there are.", "How many {objs} does the {img} have?",
     "How many {objs} appear in the {img}?", "Count the {objs}.", "Count how many {objs} there are.",
     "What number of {objs} is there?", "How many {objs} in total?"),
    ("Where is the {colour} {shape}?", "Where is the {colour} {shape} located?",
     "Where in the {img} is the {colour} {shape}?", "In which quadrant is the {colour} {shape}?",
     "Which quadrant contains the {colour} {shape}?", "Where can the {colour} {shape} be found?",
     "Where does the {colour} {shape} appear?", "Locate the {colour} {shape}.",
     "What is the position of the {colour} {shape}?", "Where is the {colour} {shape} in the {img}?",
     "Where is the {colour} {shape} placed?", "Name the quadrant of the {colour} {shape}.",
     "Which corner is the {colour} {shape} in?"),
    ("Is there {a} {colour} {shape}?", "Is there {a} {colour} {shape} in the {img}?",
     "Does the {img} show {a} {colour} {shape}?", "Does the {img} have {a} {colour} {shape}?",
     "Do you see {a} {colour} {shape}?", "Is {a} {colour} {shape} present?",
     "Is there any {colour} {shape} in the {img}?", "Does {a} {colour} {shape} appear in the {img}?",
     "Is {a} {colour} {shape} shown?", "Is {a} {colour} {shape} visible in the {img}?",
     "Can you find {a} {colour} {shape}?", "Is {a} {colour} {shape} in the {img}?"),
)

TEMPLATE_SHARE = 0.25  # how often a training question keeps its template's own words


_FILLERS = frozenset(("a", "an", "{a}", "the", "this", "that", "here", "there"))


def _normalise(text: str) -> str:
    """A wording with each synonym replaced by its set's name and without articles, demonstratives
    or "here"/"there", lower case: two wordings equal in this form are one sentence, not two."""
    words = re.findall(r"\{\w+\}|[\w']+|[^\w\s]", text.lower())
    names = {w: name for name, ws in SYNONYMS.items() for w in ws}
    return " ".join(names.get(w, w) for w in words if w not in _FILLERS)


@cache
def training_frames() -> tuple[tuple[str, ...], ...]:
    """FRAMES without any frame whose normalised form equals a held-out wording's, per template."""
    kept = []
    for frames, (_, held_out) in zip(FRAMES, PARAPHRASES, strict=True):
        banned = {_normalise(_expand_synonyms(w)) for w in held_out}
        kept.append(tuple(f for f in frames if _normalise(f) not in banned))
    return tuple(kept)


def _expand_synonyms(held_out: str) -> str:
    """A held-out wording's nouns as synonym slots, so it compares with frames in one form."""
    names = {w: "{" + name + "}" for name, ws in SYNONYMS.items() for w in ws}
    return re.sub(r"[A-Za-z]+", lambda m: names.get(m.group(0).lower(), m.group(0)), held_out)


def all_training_wordings(index: int, **slots: str) -> set[str]:
    """Every wording the grammar gives template ``index`` for these slot values (for tests)."""
    out = set()
    for frame in training_frames()[index]:
        names = [n for n in SYNONYMS if "{" + n + "}" in frame]
        for choice in itertools.product(*(SYNONYMS[n] for n in names)):
            out.add(_fill(frame, dict(zip(names, choice, strict=True)), slots))
    return out


def _fill(frame: str, synonyms: dict[str, str], slots: dict[str, str]) -> str:
    colour = slots.get("colour", "")
    article = "an" if colour[:1].lower() in "aeiou" and colour else "a"
    return frame.format(**synonyms, **slots, a=article)


def training_wording(text: str, rng: random.Random) -> str:
    """A template question in its own words (TEMPLATE_SHARE of the time) or in a grammar wording."""
    for index, (pattern, _) in enumerate(PARAPHRASES):
        m = re.fullmatch(pattern, text.strip())
        if m:
            if rng.random() < TEMPLATE_SHARE:
                return text.strip()
            frame = rng.choice(training_frames()[index])
            synonyms = {n: rng.choice(ws) for n, ws in SYNONYMS.items()}
            return _fill(frame, synonyms, m.groupdict())
    raise ValueError(f"no training wording for question {text!r}: it does not follow a synthetic-world template")
