"""The report's statistics: the paired bootstrap, the Wilson interval, pairing answers by
(kind, prompt_id), the changes table read from answers.jsonl files, the plot, and win-rate ties
between identical answers."""

import json
import random

import numpy as np
import pytest

from alignloop.config import load_recipe
from alignloop.evaluation.stats import pair_answers, paired_bootstrap, paired_mean_bootstrap, wilson_interval
from alignloop.pipeline.report import outcome, write_report


def test_paired_bootstrap_fixes_without_breaking():
    """100 prompts; a gets 50 right; b fixes 20 of a's 50 wrong ones and breaks none: the
    difference is exactly (20 - 0) / 100 = +0.20. Every resample draws gained ~ Binomial(100, 0.2)
    (sd 4) and lost = 0, so the 95% interval is about 0.20 +- 0.08: inside (0.10, 0.30), above 0."""
    a = [1] * 50 + [0] * 50
    b = [1] * 50 + [1] * 20 + [0] * 30
    change = paired_bootstrap(a, b)
    assert change.difference == pytest.approx(0.20, abs=1e-12)
    assert (change.n, change.gained, change.lost) == (100, 20, 0)
    assert 0.10 < change.low < 0.20 < change.high < 0.30
    assert paired_bootstrap(a, b) == change  # seeded: the same interval every time


def test_paired_bootstrap_identical_outcomes_is_exactly_zero():
    a = [1, 0, 1, 1, 0] * 20
    change = paired_bootstrap(a, list(a))
    assert (change.difference, change.low, change.high) == (0.0, 0.0, 0.0)
    assert (change.gained, change.lost) == (0, 0)


def test_paired_bootstrap_symmetric_swaps_contain_zero():
    """15 prompts go 0 -> 1 and 15 go 1 -> 0: no change on average, and the interval, roughly
    symmetric around 0, contains it."""
    a = [0] * 15 + [1] * 15 + [1] * 40 + [0] * 30
    b = [1] * 15 + [0] * 15 + [1] * 40 + [0] * 30
    change = paired_bootstrap(a, b)
    assert change.difference == 0.0 and (change.gained, change.lost) == (15, 15)
    assert change.low < 0 < change.high
    assert change.low == pytest.approx(-change.high, abs=0.011)


def test_paired_bootstrap_drops_pairs_with_none():
    a = [1] * 50 + [0] * 50
    b = [1] * 50 + [1] * 20 + [0] * 30
    with_none = paired_bootstrap(a + [None, 1, None], b + [0, None, None])
    assert with_none == paired_bootstrap(a, b)
    assert paired_bootstrap([None, 1], [0, None]) is None
    assert paired_bootstrap([True, False], [True, True]).gained == 1  # bools are outcomes too
    with pytest.raises(ValueError, match="align"):
        paired_bootstrap([1, 0], [1])


def test_paired_bootstrap_matches_resampling_prompts():
    """Reference: resample the prompt indices themselves (B x n). The counts shortcut draws the
    same distribution, so the two intervals agree up to Monte Carlo noise (differences sit on a
    1/n = 0.01 lattice here: at most one step apart)."""
    rng = random.Random(3)
    a = [rng.random() < 0.6 for _ in range(100)]
    b = [x if rng.random() < 0.8 else not x for x in a]
    change = paired_bootstrap(a, b, resamples=20_000)
    d = np.array(b, dtype=float) - np.array(a, dtype=float)  # (n,)
    idx = np.random.default_rng(7).integers(0, len(d), size=(20_000, len(d)))  # (B, n)
    low, high = np.quantile(d[idx].mean(axis=1), [0.025, 0.975])
    assert change.difference == pytest.approx(d.mean(), abs=1e-12)
    assert change.low == pytest.approx(low, abs=0.0101)
    assert change.high == pytest.approx(high, abs=0.0101)


def test_paired_mean_bootstrap_of_a_continuous_measure():
    """Per-record losses: b is a minus 0.5 on every record plus small noise. The mean difference
    is exact; its interval is the normal one, mean +- 1.96 sd / sqrt(n), up to Monte Carlo noise;
    a constant shift has a zero-width interval; paired_bootstrap (0/1 outcomes) would truncate
    these floats, which is why losses have their own function."""
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 1.0, 400)                      # (n,) losses that vary a lot by record
    noise = rng.normal(0.0, 0.1, 400)
    b = a - 0.5 + noise                                # the pairing removes a's spread
    change = paired_mean_bootstrap(list(a), list(b))
    d = b - a
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))      # ~0.0098
    assert change.difference == pytest.approx(d.mean(), abs=1e-12)
    assert change.low == pytest.approx(d.mean() - half, abs=0.002)
    assert change.high == pytest.approx(d.mean() + half, abs=0.002)
    assert change.high < -0.45 and change.n == 400
    shifted = paired_mean_bootstrap([1.0, 2.0, 3.0], [1.25, 2.25, 3.25])
    assert (shifted.difference, shifted.low, shifted.high) == pytest.approx((0.25, 0.25, 0.25))
    assert paired_mean_bootstrap(list(a), list(b)) == change  # seeded
    with pytest.raises(ValueError, match="align"):
        paired_mean_bootstrap([1.0], [1.0, 2.0])


def test_wilson_interval_known_values():
    """p = 0.5, n = 100: centre 0.5, half-width 1.96 * sqrt(0.0025 + 1.96^2 / 40000) / (1 +
    1.96^2 / 100) = 0.0962. 0 of 65: the upper end is (1.96^2 / 65) / (1 + 1.96^2 / 65) = 0.0558."""
    low, high = wilson_interval(50, 100)
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert wilson_interval(0, 65) == (0.0, pytest.approx(0.0558, abs=1e-4))
    assert wilson_interval(0, 0) is None


def test_pair_answers_by_kind_and_prompt_id_not_position():
    a = [{"kind": "task", "prompt_id": "p1", "v": "a1"}, {"kind": "task", "prompt_id": "p2", "v": "a2"},
         {"kind": "safety", "prompt_id": "p1", "v": "a3"}, {"kind": "task", "prompt_id": "gone", "v": "a4"}]
    b = [{"kind": "safety", "prompt_id": "p1", "v": "b3"}, {"kind": "task", "prompt_id": "p2", "v": "b2"},
         {"kind": "task", "prompt_id": "p1", "v": "b1"}, {"kind": "task", "prompt_id": "new", "v": "b5"}]
    assert [(x["v"], y["v"]) for x, y in pair_answers(a, b)] == [("a1", "b1"), ("a2", "b2"), ("a3", "b3")]
    with pytest.raises(ValueError, match=r"round_1: answer 2 repeats kind 'task', prompt_id 'p1'"):
        pair_answers(a, [b[2], b[2]], ("round_0", "round_1"))


# ---------------------------------------------------------------------------------------------
# The report from constructed evaluations


def _task_rows(correct):
    return [{"kind": "task", "prompt_id": f"t{i}", "completion": "x", "correct": c}
            for i, c in enumerate(correct)]


def _safety_rows(unsafe, refusal, judge="guard"):
    rows = [{"kind": "safety", "prompt_id": f"adv{i}", "safety": "adversarial", "completion": "x",
             "judges": {judge: {"unsafe": u, "refusal": False}, "rules": {"unsafe": False, "refusal": False}}}
            for i, u in enumerate(unsafe)]
    rows += [{"kind": "safety", "prompt_id": f"bord{i}", "safety": "borderline", "completion": "x",
              "judges": {judge: {"unsafe": False, "refusal": r}, "rules": {"unsafe": False, "refusal": True}}}
             for i, r in enumerate(refusal)]
    return rows


def _write_point(run_dir, label, answers, summary, notes=()):
    out = run_dir / ("base_eval" if label == "base" else f"{label}/eval")
    out.mkdir(parents=True)
    shuffled = list(answers)
    random.Random(label).shuffle(shuffled)  # the report pairs by (kind, prompt_id), not position
    (out / "answers.jsonl").write_text("".join(json.dumps(row) + "\n" for row in shuffled))
    (out / "metrics.json").write_text(json.dumps(
        {"summary": summary, "safety": {"notes": list(notes)}}))


def _rate(values):
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept)


@pytest.fixture()
def recipe(tmp_path):
    return load_recipe({"model": {"tiny": {}}, "output_dir": str(tmp_path / "run"), "rounds": 1,
                        "stages": ["sft"], "sft": {"data": [{"builtin": "arithmetic", "count": 8}]}},
                       [], check_trainer=False)


@pytest.fixture()
def points():
    """base, round_0, round_1: 40 task prompts (one without an answer), 20 adversarial and 10
    borderline prompts (one unparseable verdict in round_1)."""
    rng = random.Random(0)
    base = {"correct": [rng.random() < 0.2 for _ in range(40)], "unsafe": [rng.random() < 0.9 for _ in range(20)],
            "refusal": [False] * 10}
    r0 = {"correct": [c or rng.random() < 0.5 for c in base["correct"]],
          "unsafe": [u and rng.random() < 0.2 for u in base["unsafe"]], "refusal": [i < 3 for i in range(10)]}
    r1 = {"correct": [c if rng.random() < 0.8 else not c for c in r0["correct"]],
          "unsafe": list(r0["unsafe"]), "refusal": [i < 1 for i in range(10)]}
    r0["correct"][5] = None
    r1["unsafe"][7] = None
    return {"base": base, "round_0": r0, "round_1": r1}


def test_report_changes_from_answers(tmp_path, recipe, points):
    """The changes table's numbers are the paired bootstrap of the outcomes computed directly;
    VR and FRR use the primary judge ("guard"), not the other one ("rules")."""
    run_dir = tmp_path / "run"
    for label, p in points.items():
        summary = {"accuracy": _rate(p["correct"]), "vr": _rate(p["unsafe"]), "frr": _rate(p["refusal"]),
                   "judge": "guard", "vr_rules": 0.0, "frr_rules": 1.0, "on_topic": 0.9}
        _write_point(run_dir, label, _task_rows(p["correct"]) + _safety_rows(p["unsafe"], p["refusal"]),
                     summary, notes=["VR not meaningful: the rules judge sees no content"] if label == "base" else [])
    write_report(recipe, run_dir)

    report = json.loads((run_dir / "report.json").read_text())
    got = {(c["point"], c["against"]): c for c in report["changes"]}
    assert list(got) == [("round_0", "base"), ("round_1", "round_0")]  # round_1's previous is round_0
    md = (run_dir / "report.md").read_text()
    for (later, earlier), change in got.items():
        for metric, key in (("accuracy", "correct"), ("vr", "unsafe"), ("frr", "refusal")):
            direct = paired_bootstrap(points[earlier][key], points[later][key])
            assert change[metric] == {**direct.__dict__}, (later, earlier, metric)
        acc = change["accuracy"]
        assert (f"{acc['difference']:+.3f} [{acc['low']:+.3f}, {acc['high']:+.3f}] "
                f"({acc['gained']} gained, {acc['lost']} lost of {acc['n']})") in md
    assert got[("round_0", "base")]["accuracy"]["n"] == 39  # the unanswered prompt is dropped
    assert got[("round_1", "round_0")]["vr"]["n"] == 19  # so is the unparseable verdict
    assert "## Changes, paired 95% bootstrap intervals over the same prompts" in md
    assert "| round_1 vs round_0 |" in md
    for header in ("violation rate (rules)", "false-refusal rate (rules)", "on-topic rate", "safety judge"):
        assert header in md
    assert "- base: VR not meaningful: the rules judge sees no content" in md
    assert report["notes"]["base"] == ["VR not meaningful: the rules judge sees no content"]
    assert [row["label"] for row in report["rows"]] == ["base", "round_0", "round_1"]

    acc = report["intervals"]["round_1"]["accuracy"]  # the plot's error bars
    kept = [c for c in points["round_1"]["correct"] if c is not None]
    assert (acc["successes"], acc["n"]) == (sum(kept), len(kept))
    assert (acc["low"], acc["high"]) == pytest.approx(wilson_interval(sum(kept), len(kept)))
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.glob(".report*"))  # written atomically: no temporary left behind


def test_report_compares_every_round_with_round_0(tmp_path, recipe):
    run_dir = tmp_path / "run"
    for k, correct in enumerate([[0] * 10, [1] * 3 + [0] * 7, [1] * 6 + [0] * 4]):
        _write_point(run_dir, f"round_{k}", _task_rows(correct), {"accuracy": sum(correct) / 10})
    write_report(recipe, run_dir)
    changes = json.loads((run_dir / "report.json").read_text())["changes"]
    assert [(c["point"], c["against"]) for c in changes] == [
        ("round_1", "round_0"), ("round_2", "round_0"), ("round_2", "round_1")]
    assert [c["accuracy"]["difference"] for c in changes] == pytest.approx([0.3, 0.6, 0.3])
    assert all(c["vr"] is None and c["frr"] is None for c in changes)  # no safety prompts


def test_report_old_answers_without_judges(tmp_path, recipe):
    """answers.jsonl written before per-judge verdicts: accuracy still gets an interval, VR and
    FRR are shown as "-"."""
    run_dir = tmp_path / "run"
    for label, correct in (("round_0", [1, 0, 0, 1]), ("round_1", [1, 1, 0, 1])):
        old_safety = [{"kind": "safety", "prompt_id": "s0", "completion": "x"}]
        _write_point(run_dir, label, _task_rows(correct) + old_safety,
                     {"accuracy": sum(correct) / 4, "vr": 0.0, "frr": 0.0})
    write_report(recipe, run_dir)
    [change] = json.loads((run_dir / "report.json").read_text())["changes"]
    assert change["accuracy"]["gained"] == 1 and change["vr"] is None and change["frr"] is None
    assert "| round_1 vs round_0 | +0.250 [" in (run_dir / "report.md").read_text()
    assert "| - | - |" in (run_dir / "report.md").read_text()


def test_outcome_reads_the_named_judge():
    row = {"kind": "safety", "safety": "adversarial",
           "judges": {"guard": {"unsafe": None, "refusal": False}, "rules": {"unsafe": True, "refusal": False}}}
    assert outcome("vr", row, "rules") is True
    assert outcome("vr", row, "guard") is None  # unparseable: no outcome, never safe
    assert outcome("frr", row, "rules") is None  # adversarial prompts have no FRR outcome
    assert outcome("vr", row, None) is None
    assert outcome("accuracy", {"kind": "task", "correct": False}, None) is False


# ---------------------------------------------------------------------------------------------
# Win-rate ties


def test_win_rate_counts_identical_answers_as_ties(tmp_path, monkeypatch):
    """Three prompts; the new answers to p0 and p1 are the previous texts, scored 1e-6 higher and
    lower than before (batch noise), p2 is a new text that scores higher. Ties 0.5 + 0.5 and a
    win 1: win rate 2 / 3 (the float noise alone would give 1 + 0 + 1)."""
    import alignloop.reward.scoring as scoring
    from alignloop.evaluation.rounds import _reward

    prompt = [{"role": "user", "content": "q"}]
    previous = tmp_path / "round_0" / "eval"
    previous.mkdir(parents=True)
    old_texts = ["same a", "same b", "old c"]
    previous.joinpath("answers.jsonl").write_text("".join(
        json.dumps({"kind": "task", "prompt_id": f"p{i}", "prompt": prompt, "completion": t}) + "\n"
        for i, t in enumerate(old_texts)))
    batch_scores = iter([[1.000001, 0.999999, 2.0], [1.0, 1.0, 1.0]])  # this round's, then the previous'

    class NoisyScorer:
        def __init__(self, path):
            pass

        def score(self, prompts, responses):
            return next(batch_scores)

    monkeypatch.setattr(scoring, "RewardScorer", NoisyScorer)
    records = [("task", {"prompt_id": f"p{i}", "prompt": prompt}) for i in range(3)]
    answers = [{"kind": "task", "prompt_id": f"p{i}", "completion": t}
               for i, t in enumerate(["same a", "same b", "new c"])]
    out = _reward("rm", records, answers, tmp_path, "round_0")
    assert out["win_rate"] == pytest.approx(2 / 3)
    assert (out["compared"], out["identical"], out["against"]) == (3, 2, "round_0")


def test_report_in_round_points(tmp_path, recipe):
    """round_1.sft (the SFT model before DPO, evaluation.stage_ablation) sits between round_0 and
    round_1; it is compared with round_0, and round_1 with round_0 and with it."""
    run_dir = tmp_path / "run"
    _write_points(run_dir, {"round_0": [1] * 2 + [0] * 8, "round_1.sft": [1] * 5 + [0] * 5,
                            "round_1": [1] * 4 + [0] * 6})
    write_report(recipe, run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["round_0", "round_1.sft", "round_1"]
    changes = {(c["point"], c["against"]): c["accuracy"]["difference"] for c in report["changes"]}
    assert changes == pytest.approx({("round_1.sft", "round_0"): 0.3, ("round_1", "round_0"): 0.2,
                                     ("round_1", "round_1.sft"): -0.1})
    text = (run_dir / "report.md").read_text()
    assert "| round_1.sft | 0.500 |" in text
    # 10 prompts, one lost, none gained: the interval of -0.1 reaches 0
    assert "- round_1: what the stages after sft added on their own: no change distinguishable from 0" in text


def test_report_says_when_the_last_stage_moved_something(tmp_path, recipe):
    """round_1 loses all 10 prompts round_1.sft answered: the in-round reading names the change
    (-1.000: every resample loses them all, so the interval is [-1, -1] and excludes 0)."""
    run_dir = tmp_path / "run"
    _write_points(run_dir, {"round_0": [0] * 10, "round_1.sft": [1] * 10, "round_1": [0] * 10})
    write_report(recipe, run_dir)
    assert ("- round_1: what the stages after sft added on their own: accuracy -1.000 (95% interval "
            "excludes 0).") in (run_dir / "report.md").read_text()


def _write_points(run_dir, points: dict[str, list[int]]) -> None:
    """Evaluation directories for points labelled like the report's rows ("round_1.sft" is
    round_1/eval_sft), each with its task answers' correctness and accuracy."""
    for label, correct in points.items():
        point, _, stage = label.partition(".")
        out = run_dir / point / (f"eval_{stage}" if stage else "eval")
        out.mkdir(parents=True)
        (out / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _task_rows(correct)))
        (out / "metrics.json").write_text(json.dumps({"summary": {"accuracy": sum(correct) / 10}}))
