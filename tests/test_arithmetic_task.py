"""The built-in arithmetic task: correct answers, disjoint splits, deterministic."""

import re

import pytest

from alignloop.data.tasks import BUILTIN
from alignloop.reward.verifiers import resolve_verifier
from alignloop.data.tasks.arithmetic import _key, check, extract_answer, problems, records, verify


def problem_of(question):
    a, b = map(int, re.findall(r"\d+", question))
    return a, b


def test_answers_are_right():
    for r in records("prompt", "train", 500):
        a, b = problem_of(r["prompt"][0]["content"])
        q = r["prompt"][0]["content"]
        subtract = any(w in q for w in ("minus", "Subtract", " - ", "away", "difference", "taken out"))
        expected = (a - b if a >= b else b - a) if subtract else a + b
        assert r["answer"] == expected, q
    for r in records("chat", "train", 500):
        assert r["messages"][1]["content"].endswith(".")


def test_splits_are_disjoint_and_sized():
    train, held = problems("train", 4000, 0), problems("heldout", 200, 0)
    assert len(records("prompt", "train")) == 4000 and len(records("prompt", "heldout")) == 200
    train_set, held_set = {p[:3] for p in train}, {p[:3] for p in held}
    assert len(train_set) == 4000 and len(held_set) == 200  # distinct problems
    assert not train_set & held_set
    # disjoint by construction, whatever the seed
    assert not {p[:3] for p in problems("heldout", 200, 5)} & train_set


def test_deterministic_per_seed():
    assert records("chat", "train", 50, seed=1) == records("chat", "train", 50, seed=1)
    assert records("chat", "train", 50, seed=1) != records("chat", "train", 50, seed=2)
    ids = [r["id"] for r in records("chat", "train", 300)]
    assert len(set(ids)) == len(ids)


def test_preference_pairs_reject_a_wrong_worked_answer():
    """chosen is the worked answer (its last number is the result); rejected always ends in a
    different number: a dropped carry (e.g. 58 + 67: 5+6=1, 8+7=5 -> 15) or the other operation."""
    pairs = records("preference", "train", 200, seed=1)
    for pair in pairs:
        a, op, b = next((a, op, b) for a, op, b, _ in problems("train", 200, 1)
                        if f"arith-{_key(a, op, b)[:12]}" in pair["prompt_id"])
        result = a + b if op == "+" else a - b
        assert extract_answer(pair["chosen"]) == result and extract_answer(pair["rejected"]) != result
    from alignloop.data.tasks.arithmetic import slip
    assert slip(58, "+", 67, 0) == "8+7=5, 5+6=1, so the answer is 15."
    assert records("ranking", "train", 5, seed=1) == pairs[:5]  # read as rankings by reward and dpo
    with pytest.raises(ValueError, match="not 'document'"):
        records("document")


@pytest.mark.parametrize("text, value", [("The answer is 519.", 519), ("-12", -12), ("it is 1,024.", 1024),
                                         ("12 plus 30 is 42", 42), ("no number here", None), ("", None)])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_check_and_registry():
    assert check("482 plus 37 is 519.", 519) and not check("482 plus 37 is 518.", 519)
    assert not check("nothing", 3) and not check("5", None)
    assert BUILTIN["arithmetic"] is records and resolve_verifier("arithmetic") is verify


def test_worked_answers_are_true_step_by_step():
    """Each column step `x+y(+1)=s` or `(1)x-y(-1)=d` holds, carries follow from the previous
    step, and the final number is the column digits read from the left."""
    from alignloop.data.tasks.arithmetic import work

    for a, op, b, _ in problems("train", 500, 3):
        text = work(a, op, b)
        *steps, final = text.rstrip(".").split(", ")
        carry, digits = 0, []
        for step in steps:
            lhs, value = step.split("=")
            terms = [int(t) for t in re.split(r"[+-]", lhs)]
            assert (sum(terms) if op == "+" else terms[0] - sum(terms[1:])) == int(value), text
            assert (len(terms) == 3) == bool(carry), text  # the carry appears exactly when due
            carry = int(value) // 10 if op == "+" else int(terms[0] >= 10)
            digits.append(int(value) % 10)
        expected = a + b if op == "+" else a - b
        assert int(str(carry if op == "+" else "") + "".join(map(str, reversed(digits)))) == expected
        assert final == f"so the answer is {expected}" and extract_answer(text) == expected


def test_half_the_heldout_prompts_use_phrasings_no_training_record_uses():
    """Held-out templates (HELDOUT_QUESTIONS) never word a training record; about half of the
    held-out prompts use one, and metadata.phrasing says which; answers stay right for them."""
    from alignloop.data.tasks.arithmetic import HELDOUT_QUESTIONS, QUESTIONS

    def stem(template):  # the template's fixed words: what a model could learn by heart
        return re.sub(r"\{[ab]\}", "#", template)

    def shape(text):
        return re.sub(r"\d+", "#", text)

    held_shapes = {stem(t) for op in "+-" for t in HELDOUT_QUESTIONS[op]}
    train_shapes = {stem(t) for op in "+-" for t in QUESTIONS[op]}
    assert not held_shapes & train_shapes
    for kind in ("chat", "prompt", "preference"):
        for r in records(kind, "train", 1000):
            text = (r["messages"] if kind == "chat" else r["prompt"])[0]["content"]
            assert shape(text) in train_shapes and r["metadata"]["phrasing"] == "train"
    held = records("prompt", "heldout")
    unseen = [r for r in held if r["metadata"]["phrasing"] == "heldout"]
    assert {shape(r["prompt"][0]["content"]) for r in unseen} == held_shapes  # every one used
    assert all(shape(r["prompt"][0]["content"]) in train_shapes for r in held if r not in unseen)
    assert 0.35 < len(unseen) / len(held) < 0.65
    for r, (a, op, b, _) in zip(held, problems("heldout", 200, 0)):
        assert r["answer"] == (a + b if op == "+" else a - b)
