"""Verifiers (programmatic checks beside the reward model) and the weighted scores of responses."""

import sys
import textwrap

import pytest

from alignloop.options import ScoringConfig
from alignloop.reward.scoring import score_responses
from alignloop.reward.verifiers import VERIFIERS, resolve_verifier

RECORD = {"prompt_id": "p1", "prompt": [{"role": "user", "content": "What is 482 plus 37?"}], "answer": 519}


@pytest.mark.parametrize("response, expected", [
    ("2+7=9, 8+3=11, 4+0+1=5, so the answer is 519.", 1.0),  # the worked answer
    ("519", 1.0),
    ("The answer is 1,519? No: 519.", 1.0),                     # the last number counts
    ("482 plus 37 is 518.", 0.0),
    ("519 is wrong, it is 520.", 0.0),
    ("I cannot do arithmetic.", 0.0),                            # no number at all
])
def test_arithmetic_verifier(response, expected):
    assert resolve_verifier("arithmetic")(RECORD, response) == expected


def test_arithmetic_verifier_does_not_apply_without_an_answer():
    assert resolve_verifier("arithmetic")({"prompt": RECORD["prompt"]}, "519") is None


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A package `my_checks` on sys.path with a verifier, a non-callable and a broken module."""
    package = tmp_path / "my_checks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "style.py").write_text(textwrap.dedent("""
        LIMIT = 20

        def short(record, response):
            return 1.0 if len(response) <= LIMIT else 0.0

        def crashes(record, response):
            return record["missing_key"]

        def says_yes(record, response):
            return "yes"
    """))
    (package / "broken.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_checks"
    for name in [m for m in sys.modules if m.startswith("my_checks")]:
        del sys.modules[name]


def test_user_verifier_by_import_path(user_module):
    short = resolve_verifier("my_checks.style:short")
    assert short(RECORD, "519") == 1.0 and short(RECORD, "x" * 21) == 0.0


@pytest.mark.parametrize("name, message", [
    ("arithmetics", r"unknown verifier 'arithmetics' \(known: arithmetic, safety, shapes; or package.module:function\)"),
    ("my_checks.nowhere:f", r"verifier 'my_checks.nowhere:f': cannot import my_checks.nowhere "
                            r"\(ModuleNotFoundError: No module named 'my_checks.nowhere'\)"),
    ("my_checks.style:absent", r"verifier 'my_checks.style:absent': my_checks.style has no function 'absent'"),
    ("my_checks.style:LIMIT", r"my_checks.style has no function 'LIMIT'"),  # exists, not callable
    ("my_checks.broken:oops", r"cannot import my_checks.broken \(SyntaxError: "),
    ("my_checks.style:", r"expected package.module:function"),
])
def test_bad_verifier_names(user_module, name, message):
    with pytest.raises(ValueError, match=message):
        resolve_verifier(name)


def test_registry_lists_import_paths_only():
    """The registry must stay import-light: values are 'module:function' strings."""
    assert all(isinstance(v, str) and v.count(":") == 1 for v in VERIFIERS.values())


class FakeScorer:
    """Stands in for RewardScorer: the reward is the response's length / 10."""

    def score(self, prompts, responses):
        assert len(prompts) == len(responses)
        return [len(r) / 10 for r in responses]


def test_weighted_totals(user_module):
    """Weights: reward model 0.5, arithmetic 2, my_checks.style:short 1 (short: <= 20 characters).
    - "519" (3 chars):            reward 0.3, arithmetic 1, short 1 -> 0.5*0.3 + 2*1 + 1*1 = 3.15
    - "the answer is 520" (17):   reward 1.7, arithmetic 0, short 1 -> 0.85 + 0 + 1       = 1.85
    - "so it is 519, surely!!!" (23): reward 2.3, arithmetic 1, short 0 -> 1.15 + 2 + 0   = 3.15
    """
    scoring = ScoringConfig(reward_model=0.5, verifiers={"arithmetic": 2.0, "my_checks.style:short": 1.0})
    responses = ["519", "the answer is 520", "so it is 519, surely!!!"]
    scores = score_responses([RECORD] * 3, responses, scoring, FakeScorer())
    assert [s["total"] for s in scores] == pytest.approx([3.15, 1.85, 3.15])
    assert [s["reward_model"] for s in scores] == pytest.approx([0.3, 1.7, 2.3])
    assert [s["verifiers"] for s in scores] == [
        {"arithmetic": 1.0, "my_checks.style:short": 1.0},
        {"arithmetic": 0.0, "my_checks.style:short": 1.0},
        {"arithmetic": 1.0, "my_checks.style:short": 0.0}]


def test_verifiers_alone_need_no_reward_model():
    """reward_model weight 0: no scorer needed, reward_model is None, total = 3 x arithmetic."""
    scoring = ScoringConfig(reward_model=0.0, verifiers={"arithmetic": 3.0})
    scores = score_responses([RECORD, RECORD], ["519", "5"], scoring)
    assert [(s["reward_model"], s["total"]) for s in scores] == [(None, 3.0), (None, 0.0)]


def test_scoring_errors_name_the_verifier_and_record(user_module):
    with pytest.raises(ValueError, match="no reward model was given"):
        score_responses([RECORD], ["519"], ScoringConfig(reward_model=1.0))
    crashes = ScoringConfig(reward_model=0.0, verifiers={"my_checks.style:crashes": 1.0})
    with pytest.raises(ValueError, match=r"verifier 'my_checks.style:crashes' on prompt_id 'p1' failed: "
                                         r"KeyError: 'missing_key'"):
        score_responses([RECORD], ["519"], crashes)
    says_yes = ScoringConfig(reward_model=0.0, verifiers={"my_checks.style:says_yes": 1.0})
    with pytest.raises(ValueError, match=r"returned 'yes'; a verifier returns a number in \[0, 1\]"):
        score_responses([RECORD], ["519"], says_yes)
    with pytest.raises(ValueError, match="2 records but 1 responses"):
        score_responses([RECORD, RECORD], ["519"], says_yes)


def test_a_verifier_that_does_not_apply_is_left_out_of_the_total():
    """A mixed prompt set: the arithmetic check returns None for a prompt without an answer, so
    that prompt's total is the other verifier's alone (weight 2 x 1.0 = 2.0), not 2.0 + 0."""
    from alignloop.options import ScoringConfig
    from alignloop.reward.scoring import score_responses

    records = [{"prompt_id": "math", "prompt": [{"role": "user", "content": "What is 2 plus 2?"}],
                "answer": 4},
               {"prompt_id": "chat", "prompt": [{"role": "user", "content": "Say hi."}]}]
    scoring = ScoringConfig(reward_model=0, verifiers={"arithmetic": 1.0, "tests.test_verifiers:always_one": 2.0})
    scores = score_responses(records, ["so the answer is 4.", "Hi!"], scoring)
    assert scores[0]["verifiers"] == {"arithmetic": 1.0, "tests.test_verifiers:always_one": 1.0}
    assert scores[1]["verifiers"]["arithmetic"] is None
    assert [s["total"] for s in scores] == [3.0, 2.0]


def always_one(record, response):
    return 1.0
