"""Held-out wordings of the synthetic world's questions: does the model answer the question or the template?

Every evaluation question of :func:`make_world` comes from one of seven training templates.
A model could learn the templates instead of the task; asking the same held-out images the
same questions in wordings that training never used tells the two apart. Each training
template is matched by a pattern and re-worded by a template drawn (by a seeded RNG) from
its own list here; the answer and everything else in the record are kept.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from chiasm.data.llava import load_llava, save_llava
from chiasm.data.sample import IMAGE_PLACEHOLDER, Sample, Turn

# (training question as a pattern, held-out wordings of it); named groups fill the wordings.
PARAPHRASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"What colour is the object in the (?P<cell>[a-z ]+)\?",
     ("Which colour does the thing in the {cell} have?", "Tell me the colour of the shape in the {cell}.",
      "The object in the {cell}: what colour is it?")),
    (r"What colour is the (?P<shape>[a-z]+)\?",
     ("Which colour does the {shape} have?", "Tell me the colour of the {shape}.",
      "The {shape} is painted in which colour?")),
    (r"What shape is the (?P<colour>[a-z]+) object\?",
     ("Which shape is drawn in {colour}?", "Name the form of the {colour} thing.",
      "The {colour} object has which shape?")),
    (r"What shape is the object in the (?P<cell>[a-z ]+)\?",
     ("Which shape is drawn in the {cell}?", "Name the form of the thing in the {cell}.",
      "The object in the {cell} has which shape?")),
    (r"How many objects are there\?",
     ("Count the shapes in this picture.", "What is the number of things drawn here?",
      "How many shapes can you see?")),
    (r"Where is the (?P<colour>[a-z]+) (?P<shape>[a-z]+)\?",
     ("In which part of the picture is the {colour} {shape}?", "Which corner holds the {colour} {shape}?",
      "Tell me where the {colour} {shape} is.")),
    (r"Is there an? (?P<colour>[a-z]+) (?P<shape>[a-z]+)\?",
     ("Does the picture contain a {colour} {shape}?", "Can you see a {colour} {shape} here?",
      "Is a {colour} {shape} drawn in this image?")),
)


def paraphrase_question(text: str, rng: random.Random) -> str:
    """One held-out wording of a training-template question, or a clear error for any other text."""
    for pattern, wordings in PARAPHRASES:
        m = re.fullmatch(pattern, text.strip())
        if m:
            return rng.choice(wordings).format(**m.groupdict())
    raise ValueError(f"no paraphrase for question {text!r}: it does not follow a synthetic-world template")


def write_paraphrased(eval_file: Path, out_file: Path, *, image_root: Path | None = None, seed: int = 0) -> Path:
    """Copy an evaluation file with every question re-worded; answers, images and meta unchanged."""
    samples = load_llava(eval_file, image_root).samples
    rng = random.Random(f"chiasm-paraphrase:{seed}")
    out = []
    for s in samples:
        turns = []
        for t in s.conversations:
            if t.role != "human":
                turns.append(t)
                continue
            had_image = IMAGE_PLACEHOLDER in t.text
            question = paraphrase_question(t.text.replace(IMAGE_PLACEHOLDER, "").strip(), rng)
            turns.append(Turn("human", f"{IMAGE_PLACEHOLDER}\n{question}" if had_image else question))
        out.append(Sample(s.id, turns, s.images, {**s.meta, "wording": "paraphrased"}, source=s.source))
    save_llava(out, out_file, image_root or Path(eval_file).parent)
    return out_file
