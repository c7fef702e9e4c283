"""The built-in arithmetic task: correct answers, disjoint splits, deterministic."""

import re

import pytest

from alignloop.data.tasks import BUILTIN, VERIFIERS
from alignloop.data.tasks.arithmetic import check, extract_answer, problems, records


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


def test_no_preference_data():
    with pytest.raises(ValueError, match="no preference data"):
        records("preference")


@pytest.mark.parametrize("text, value", [("The answer is 519.", 519), ("-12", -12), ("it is 1,024.", 1024),
                                         ("12 plus 30 is 42", 42), ("no number here", None), ("", None)])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_check_and_registry():
    assert check("482 plus 37 is 519.", 519) and not check("482 plus 37 is 518.", 519)
    assert not check("nothing", 3) and not check("5", None)
    assert BUILTIN["arithmetic"] is records and VERIFIERS["arithmetic"] is check
