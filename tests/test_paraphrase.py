"""The synthetic world's held-out wordings: every training template re-worded, answers and images kept."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from chiasm.data.llava import load_llava
from chiasm.synthetic.paraphrase import PARAPHRASES, paraphrase_question, write_paraphrased
from chiasm.synthetic.wordings import SYNONYMS, all_training_wordings, training_frames, training_wording
from chiasm.synthetic.world import make_world


def test_every_eval_question_gets_an_unseen_wording_with_its_answer_kept(tmp_path: Path) -> None:
    world = make_world(tmp_path / "w", n_train=24, n_eval=12, image_size=32, turns_per_conversation=5)
    out = write_paraphrased(world.eval, tmp_path / "w" / "eval_paraphrased.json")
    before, after = load_llava(world.eval).samples, load_llava(out).samples
    assert [s.id for s in after] == [s.id for s in before]
    trained = {t.text.replace("<image>", "").strip() for s in load_llava(world.instruct).samples
               for t in s.conversations if t.role == "human"}
    for old, new in zip(before, after, strict=True):
        q_old, q_new = old.conversations[0].text, new.conversations[0].text
        assert q_new.startswith("<image>\n") and q_new != q_old
        assert q_new.replace("<image>", "").strip() not in trained  # a wording training never used
        assert new.images == old.images and new.meta["answer"] == old.meta["answer"]
        assert new.meta["question_type"] == old.meta["question_type"] and new.meta["wording"] == "paraphrased"
        # What the question names (colour, shape, quadrant) survives the re-wording.
        for word in re.findall(r"red|green|blue|yellow|purple|orange|circle|square|triangle|top|bottom|left|right",
                               q_old):
            assert word in q_new
    assert {s.meta["question_type"] for s in after} == {"colour", "shape", "count", "position", "existence"}


def test_each_template_has_three_wordings_all_reachable() -> None:
    rng = random.Random(0)
    seen = {paraphrase_question("Where is the red circle?", rng) for _ in range(60)}
    assert seen == {w.format(colour="red", shape="circle") for w in PARAPHRASES[5][1]}
    assert all(len(wordings) == 3 for _, wordings in PARAPHRASES)


def test_a_question_outside_the_templates_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="no paraphrase for question 'Why is the sky blue\\?'"):
        paraphrase_question("Why is the sky blue?", random.Random(0))


def test_training_wordings_are_disjoint_from_the_held_out_ones_and_keep_the_answers(tmp_path: Path) -> None:
    plain = make_world(tmp_path / "plain", n_train=24, n_eval=6, image_size=32, turns_per_conversation=5)
    varied = make_world(tmp_path / "varied", n_train=24, n_eval=6, image_size=32, turns_per_conversation=5,
                        train_wordings=True)
    held_out = {w for _, wordings in PARAPHRASES for w in wordings}
    a, b = load_llava(plain.instruct).samples, load_llava(varied.instruct).samples
    changed = 0
    for s, t in zip(a, b, strict=True):
        assert [i.name for i in s.images] == [i.name for i in t.images] and s.meta == t.meta
        for x, y in zip(s.conversations, t.conversations, strict=True):
            assert x.role == y.role
            if x.role == "gpt":
                assert x.text == y.text  # the same answers, turn by turn
            else:
                q = y.text.replace("<image>", "").strip()
                assert not any(re.fullmatch(re.sub(r"\\{\\w+\\}", ".+", re.escape(w)), q) for w in held_out)
                changed += x.text != y.text
    assert changed > 0
    # The evaluation split is untouched by the option.
    assert varied.eval.read_bytes() == plain.eval.read_bytes()  # image paths are stored relative


def test_training_wording_draws_the_template_or_a_grammar_wording() -> None:
    rng = random.Random(1)
    seen = {training_wording("How many objects are there?", rng) for _ in range(400)}
    assert "How many objects are there?" in seen and len(seen) > 60
    assert seen <= {"How many objects are there?", *all_training_wordings(4)}
    # The colour's article follows the colour ("an orange", "a red"), the slots are kept.
    asked = {training_wording("Is there a orange circle?", rng) for _ in range(200)}
    assert all("orange circle" in q for q in asked) and any(" an orange circle" in q for q in asked)
    with pytest.raises(ValueError, match="no training wording for question 'Why\\?'"):
        training_wording("Why?", rng)


def _shape_of(text: str) -> str:
    """A wording with synonyms as set names, without articles and demonstratives: its sentence shape."""
    names = {w: "{" + n + "}" for n, ws in SYNONYMS.items() for w in ws}
    fillers = {"a", "an", "the", "this", "that", "here", "there"}
    return " ".join(names.get(w, w) for w in re.findall(r"[\w{}']+|[^\w\s]", text.lower()) if w not in fillers)


@pytest.mark.parametrize("index", range(len(PARAPHRASES)))
def test_no_training_sentence_is_a_held_out_one_with_other_nouns(index: int) -> None:
    slots = {"cell": "top left", "shape": "circle", "colour": "red"}
    trained = {_shape_of(w) for w in all_training_wordings(index, **slots)}
    for held_out in PARAPHRASES[index][1]:
        assert _shape_of(held_out.format(**slots)) not in trained
    assert len(training_frames()[index]) >= 8  # enough sentence frames that no one wording is learnt
