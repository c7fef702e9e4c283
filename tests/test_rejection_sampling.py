"""Rejection sampling: selection on crafted candidates, the stage end to end on the tiny model,
scores from a reward model, and the inputs it must refuse before sampling anything."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from alignloop.config import load_recipe
from alignloop.data.contracts import validate_record
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.rejection_sampling import stage
from alignloop.rejection_sampling.config import RejectionSamplingConfig, group_sizes


def _cand(prompt_id, k, total, text=None, finish="stop"):
    return {"prompt_id": prompt_id, "sample_id": f"{prompt_id}:{k}", "finish_reason": finish,
            "completion": f"answer {prompt_id} {k}" if text is None else text,
            "scores": {"reward_model": None, "verifiers": {}, "total": total}}


PROMPTS = {p: [{"role": "user", "content": f"question {p}"}] for p in ("a", "b", "c")}


def _shuffled(rows, seed=0):
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _by_prompt(records, key):
    return {r["metadata"]["prompt_id"] if key == "best" else r["prompt_id"]: r for r in records}


# ---- selection ----------------------------------------------------------------------------------

def test_select_keeps_the_argmax_of_each_prompt_whatever_the_row_order():
    """Totals are written by hand so that the argmax is at a different sample index per prompt
    (a: k=2 with 0.9, b: k=0 with 0.7, c: k=3 with 0.5); the rows are shuffled, so a row
    position never equals a sample index. The worst (a: k=1, b: k=3, c: k=0) is the rejected one."""
    totals = {"a": [0.1, -0.4, 0.9, 0.3], "b": [0.7, 0.2, 0.6, -0.1], "c": [-1.0, 0.0, 0.4, 0.5]}
    rows = _shuffled(_cand(p, k, t) for p, ts in totals.items() for k, t in enumerate(ts))
    out = stage.select(rows, PROMPTS, round=2)
    best = _by_prompt(out.best, "best")
    assert {p: r["metadata"]["sample_id"] for p, r in best.items()} == {"a": "a:2", "b": "b:0", "c": "c:3"}
    assert best["a"]["messages"] == PROMPTS["a"] + [{"role": "assistant", "content": "answer a 2"}]
    assert best["a"]["metadata"] == {"prompt_id": "a", "sample_id": "a:2", "score": 0.9, "round": 2,
                                     "source": "rejection_sampling"}
    assert [r["metadata"]["prompt_id"] for r in out.best] == ["a", "b", "c"]  # order of PROMPTS
    pairs = _by_prompt(out.pairs, "pair")
    assert {p: (r["metadata"]["chosen_sample_id"], r["metadata"]["rejected_sample_id"])
            for p, r in pairs.items()} == {"a": ("a:2", "a:1"), "b": ("b:0", "b:3"), "c": ("c:3", "c:0")}
    assert pairs["b"]["chosen"] == [{"role": "assistant", "content": "answer b 0"}]
    assert pairs["b"]["rejected"] == [{"role": "assistant", "content": "answer b 3"}]
    for record in out.best:
        validate_record(record, "chat")
    for record in out.pairs:
        validate_record(record, "preference")
    assert sum(out.skipped.values()) == 0


def test_select_breaks_ties_by_sample_index_not_by_text_order():
    """k=3 and k=10 share the top score 1.0, k=5 and k=12 the bottom score 0.0. As text, 'a:10'
    sorts before 'a:3'; by sample index 3 comes first, so 3 is the best and 5 the worst, for any
    row order."""
    rows = [_cand("a", k, t) for k, t in [(10, 1.0), (3, 1.0), (12, 0.0), (5, 0.0), (7, 0.5)]]
    for seed in range(4):
        out = stage.select(_shuffled(rows, seed), {"a": PROMPTS["a"]}, round=1)
        assert out.best[0]["id"] == "a:3"
        assert out.pairs[0]["metadata"]["rejected_sample_id"] == "a:5"


def test_select_skips_small_gaps_and_identical_texts_and_counts_them():
    """a: best 0.50 - worst 0.45 = 0.05 <= min_gap 0.1 -> no pair; b: best and worst have the
    same text (different scores, e.g. verifiers that read metadata) -> no pair; c: gap 1.0 -> a
    pair. Every prompt still keeps its best."""
    rows = [_cand("a", 0, 0.5), _cand("a", 1, 0.45),
            _cand("b", 0, 1.0, text="42"), _cand("b", 1, 0.0, text=" 42 "),
            _cand("c", 0, 1.0), _cand("c", 1, 0.0)]
    out = stage.select(_shuffled(rows), PROMPTS, round=1, min_gap=0.1)
    assert [p["prompt_id"] for p in out.pairs] == ["c"]
    assert out.skipped["pair_small_gap"] == 1 and out.skipped["pair_same_text"] == 1
    assert len(out.best) == 3
    assert stage.select(rows, PROMPTS, round=1, pairs=False).pairs == []


def test_select_excludes_truncated_and_empty_samples():
    """a: the top score (0.9, k=0) was cut at max_new_tokens, so k=1 (0.5) is the best; the
    truncated one may still be rejected when it scores lowest (b: k=1, 0.1). c: its only complete
    sample is empty and the other truncated -> nothing kept. With keep_truncated, a keeps k=0.
    Counts: truncated samples a:0, b:1, c:1 = 3; empty c:0 = 1; prompts with nothing: c."""
    rows = [_cand("a", 0, 0.9, finish="length"), _cand("a", 1, 0.5), _cand("a", 2, 0.2),
            _cand("b", 0, 0.8), _cand("b", 1, 0.1, finish="length"),
            _cand("c", 0, 0.9, text="  "), _cand("c", 1, 0.3, finish="length")]
    out = stage.select(_shuffled(rows), PROMPTS, round=1)
    assert [r["id"] for r in out.best] == ["a:1", "b:0"]
    assert [(p["metadata"]["chosen_sample_id"], p["metadata"]["rejected_sample_id"])
            for p in out.pairs] == [("a:1", "a:2"), ("b:0", "b:1")]
    assert (out.skipped["truncated_sample"], out.skipped["empty_sample"],
            out.skipped["no_complete_sample"]) == (3, 1, 1)
    kept = stage.select(rows, PROMPTS, round=1, keep_truncated=True)
    assert [r["id"] for r in kept.best] == ["a:0", "b:0", "c:1"]
    assert kept.skipped["truncated_sample"] == 0 and kept.skipped["empty_sample"] == 1


def test_select_min_score_keeps_nothing_for_a_weak_prompt():
    """min_score 0.5: a's best is 0.9 (kept), b's best is 0.4 (neither best nor pair)."""
    rows = [_cand("a", 0, 0.9), _cand("a", 1, 0.0), _cand("b", 0, 0.4), _cand("b", 1, 0.0)]
    out = stage.select(rows, {"a": PROMPTS["a"], "b": PROMPTS["b"]}, round=1, min_score=0.5)
    assert [r["id"] for r in out.best] == ["a:0"]
    assert [p["prompt_id"] for p in out.pairs] == ["a"]
    assert out.skipped["below_min_score"] == 1


def _verdicts(rows, verdicts):
    for row in rows:
        row["scores"]["verifiers"] = {"check": verdicts[row["sample_id"]]}
    return rows


def test_select_keeps_a_verified_answer_over_a_wrong_one_the_reward_model_prefers():
    """Llama 3's rule: filter by the verifier, then rank the survivors. a: k=0 has the highest
    total (0.9, RM-weighted) but fails its verifier (0.0); k=1 passes with total 0.1 and k=2
    passes with 0.3 -> the best is a:2 (highest passing), the pair a:2 vs a:0 (the only failure,
    even though it is the top total). b: the verifier does not apply (None) -> argmax b:0 and
    argmin b:1 as without verifiers."""
    rows = _verdicts([_cand("a", 0, 0.9), _cand("a", 1, 0.1), _cand("a", 2, 0.3),
                      _cand("b", 0, 0.8), _cand("b", 1, 0.2)],
                     {"a:0": 0.0, "a:1": 1.0, "a:2": 1.0, "b:0": None, "b:1": None})
    out = stage.select(_shuffled(rows), {"a": PROMPTS["a"], "b": PROMPTS["b"]}, round=1)
    assert [r["id"] for r in out.best] == ["a:2", "b:0"]
    assert [(p["metadata"]["chosen_sample_id"], p["metadata"]["rejected_sample_id"])
            for p in out.pairs] == [("a:2", "a:0"), ("b:0", "b:1")]
    assert sum(out.skipped.values()) == 0


def test_select_keeps_nothing_when_every_sample_fails_and_counts_it():
    """a: all three samples fail (0.0, 0.5 < the pass mark 1.0, 0.0) -> no best, no pair,
    all_failed 1, although a:1's total (0.9) would be the argmax. b: both pass -> its best b:1
    (higher total) goes to SFT but there is no failing sample to reject: no pair
    (pair_none_failed 1). c: one pass, one fail -> best and pair."""
    rows = _verdicts([_cand("a", 0, 0.2), _cand("a", 1, 0.9), _cand("a", 2, 0.1),
                      _cand("b", 0, 0.4), _cand("b", 1, 0.6),
                      _cand("c", 0, 0.0), _cand("c", 1, 0.5)],
                     {"a:0": 0.0, "a:1": 0.5, "a:2": 0.0, "b:0": 1.0, "b:1": 1.0,
                      "c:0": 1.0, "c:1": 0.0})
    out = stage.select(_shuffled(rows), PROMPTS, round=1)
    assert [r["id"] for r in out.best] == ["b:1", "c:0"]
    assert [(p["metadata"]["chosen_sample_id"], p["metadata"]["rejected_sample_id"])
            for p in out.pairs] == [("c:0", "c:1")]
    assert (out.skipped["all_failed"], out.skipped["pair_none_failed"]) == (1, 1)
    # a lower pass mark lets a:1 (0.5) pass: it becomes a's best, paired with a:0 (lowest failing)
    loose = stage.select(rows, PROMPTS, round=1, min_verifier_score=0.5)
    assert loose.best[0]["id"] == "a:1" and loose.skipped["all_failed"] == 0
    assert loose.pairs[0]["metadata"]["rejected_sample_id"] == "a:2"  # 0.1 < a:0's 0.2


def test_select_without_a_pass_mark_lets_verifiers_only_add_to_the_total():
    """min_verifier_score None: the argmax of the totals whatever the verdicts (a:1, which
    failed), the argmin as the rejected one (a:2), and b keeps a pair of two passing answers."""
    rows = _verdicts([_cand("a", 0, 0.2), _cand("a", 1, 0.9), _cand("a", 2, 0.1),
                      _cand("b", 0, 0.4), _cand("b", 1, 0.6)],
                     {"a:0": 0.0, "a:1": 0.0, "a:2": 0.0, "b:0": 1.0, "b:1": 1.0})
    out = stage.select(rows, {"a": PROMPTS["a"], "b": PROMPTS["b"]}, round=1, min_verifier_score=None)
    assert [r["id"] for r in out.best] == ["a:1", "b:1"]
    assert [p["metadata"]["rejected_sample_id"] for p in out.pairs] == ["a:2", "b:0"]


def test_select_does_not_pick_a_truncated_passing_answer_or_reject_a_passing_one():
    """a: k=0 passes but was cut at max_new_tokens (not a whole answer), k=1 passes, k=2 fails
    and is truncated: the best is a:1 and the rejected a:2 (truncated failures may be rejected).
    b: its only passing answer is truncated -> nothing kept (all_failed counts prompts with no
    passing whole answer)."""
    rows = _verdicts([_cand("a", 0, 0.9, finish="length"), _cand("a", 1, 0.5),
                      _cand("a", 2, 0.0, finish="length"),
                      _cand("b", 0, 0.9, finish="length"), _cand("b", 1, 0.3)],
                     {"a:0": 1.0, "a:1": 1.0, "a:2": 0.0, "b:0": 1.0, "b:1": 0.0})
    out = stage.select(rows, {"a": PROMPTS["a"], "b": PROMPTS["b"]}, round=1)
    assert [r["id"] for r in out.best] == ["a:1"]
    assert [p["metadata"]["rejected_sample_id"] for p in out.pairs] == ["a:2"]
    assert out.skipped["all_failed"] == 1


def test_select_refuses_a_candidate_of_an_unknown_prompt():
    with pytest.raises(ValueError, match="'z:0'.*unknown prompt_id 'z'"):
        stage.select([_cand("z", 0, 1.0)], PROMPTS, round=1)


# ---- groups and system prompts ------------------------------------------------------------------

def test_groups_share_k_with_the_remainder_first():
    """K=10 over 3 groups: 10 // 3 = 3 each, remainder 1 to the first -> [4, 3, 3]; sample
    indices run on: 0-3, 4-6, 7-9. System prompts are the outer loop."""
    assert group_sizes(10, 3) == [4, 3, 3]
    rs = RejectionSamplingConfig(num_samples=10, temperatures=[0.5, 1.0, 1.5])
    groups = stage.sampling_groups(rs, seed=1)
    assert [(g.n, g.first_k, g.temperature) for g in groups] == [(4, 0, 0.5), (3, 4, 1.0), (3, 7, 1.5)]
    rs = RejectionSamplingConfig(num_samples=5, temperatures=[0.5, 1.0], system_prompts=[None, "Be brief."])
    groups = stage.sampling_groups(rs, seed=1)
    assert [(g.system_prompt, g.temperature, g.n) for g in groups] == [
        (None, 0.5, 2), (None, 1.0, 1), ("Be brief.", 0.5, 1), ("Be brief.", 1.0, 1)]
    assert len({g.seed for g in groups}) == 4
    assert [g.seed for g in groups] != [g.seed for g in stage.sampling_groups(rs, seed=2)]


def test_greedy_group_with_several_samples_is_a_config_error():
    """K=3 over temperatures [0, 1]: the greedy group gets 2 samples, which would be identical."""
    with pytest.raises(ValueError, match="temperature 0"):
        RejectionSamplingConfig(num_samples=3, temperatures=[0.0, 1.0])
    RejectionSamplingConfig(num_samples=3, temperatures=[1.0, 0.0])  # greedy group gets 1: fine


def test_system_prompt_is_prepended_or_appended_to_the_prompts_own():
    user = [{"role": "user", "content": "hi"}]
    own = [{"role": "system", "content": "You are terse."}] + user
    assert stage.with_system(user, None) is user
    assert stage.with_system(user, "Use bullet points.") == [
        {"role": "system", "content": "Use bullet points."}] + user
    assert stage.with_system(own, "Use bullet points.") == [
        {"role": "system", "content": "You are terse.\n\nUse bullet points."}] + user


# ---- the stage on the tiny model ----------------------------------------------------------------

VERIFIER = '''
def score(record, response):
    """Longer answers score higher: 0.01 per character, at most 1."""
    return min(len(response), 100) / 100
'''
SYSTEM = "Answer with the number only."


def _recipe(rs: dict):
    return load_recipe({"stages": ["rejection_sampling"], "rejection_sampling": rs}, check_trainer=False)


def _ctx(tiny_dir, tmp_path, reward_model=None):
    return StageContext(name="rejection_sampling", round=1, policy=str(tiny_dir), base=str(tiny_dir),
                        work_dir=tmp_path / "work", log_dir=tmp_path / "logs", seed=3,
                        reward_model=reward_model)


def _read(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sample_index(row):
    return int(row["sample_id"].rpartition(":")[2])


@pytest.fixture()
def length_verifier(tmp_path, monkeypatch):
    (tmp_path / "rs_length_verifier.py").write_text(VERIFIER)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rs_length_verifier:score"


@pytest.mark.slow
def test_stage_keeps_the_argmax_of_every_prompt(tiny_dir, tmp_path, length_verifier):
    """K=6 over 2 system prompts x 2 temperatures -> groups of [2, 2, 1, 1] (6 // 4 = 1, the
    remainder 2 to the first two). Scores: the arithmetic verifier (0 for an untrained model)
    plus 0.5 x the length verifier, so they vary; `min_verifier_score: null` makes the verifiers
    score only (no filter), so every prompt keeps an argmax. The untrained model rarely ends a turn within
    12 tokens, so truncated samples are allowed as best. The expected best and worst of each
    prompt are recomputed here from candidates.jsonl: highest (lowest) total among non-empty
    completions, ties to the lowest sample index."""
    cfg = _recipe({"prompts": [{"builtin": "arithmetic", "count": 3}], "num_samples": 6,
                   "temperatures": [0.7, 1.3], "system_prompts": [None, SYSTEM],
                   "max_new_tokens": 12, "keep_truncated": True, "min_verifier_score": None,
                   "scoring": {"reward_model": 0, "verifiers": {"arithmetic": 1.0, length_verifier: 0.5}}})
    out = tmp_path / "out"
    metrics = stage.run(cfg, _ctx(tiny_dir, tmp_path), out)

    candidates = _read(out / "candidates.jsonl")
    assert len(candidates) == 18 and len({c["sample_id"] for c in candidates}) == 18
    by_prompt: dict[str, list] = {}
    for c in candidates:
        by_prompt.setdefault(c["prompt_id"], []).append(c)
        assert set(c) == {"prompt_id", "sample_id", "prompt", "completion", "system_prompt",
                          "temperature", "finish_reason", "scores", "generator", "round"}
        validate_record({"prompt": c["prompt"]}, "prompt")
        original = c["prompt"][1:] if c["system_prompt"] else c["prompt"]
        if c["system_prompt"]:
            assert c["prompt"][0] == {"role": "system", "content": SYSTEM}
        expected = 0.5 * min(len(c["completion"]), 100) / 100
        assert c["scores"]["total"] == pytest.approx(expected)
        assert c["generator"]["temperature"] == c["temperature"] and c["generator"]["backend"] == "hf"
        assert original[-1]["role"] == "user"
    assert len(by_prompt) == 3
    for rows in by_prompt.values():
        assert sorted(_sample_index(r) for r in rows) == list(range(6))
        groups = Counter((r["system_prompt"], r["temperature"]) for r in rows)
        assert groups == {(None, 0.7): 2, (None, 1.3): 2, (SYSTEM, 0.7): 1, (SYSTEM, 1.3): 1}

    def pick(rows, sign):
        usable = [r for r in rows if r["completion"].strip()]
        return min(usable, key=lambda r: (-sign * r["scores"]["total"], _sample_index(r)))

    best = _read(out / "best.jsonl")
    assert {b["metadata"]["prompt_id"]: b["id"] for b in best} == {
        p: pick(rows, +1)["sample_id"] for p, rows in by_prompt.items()}
    for record in best:
        assert validate_record(record, "chat") == record
        assert record["messages"][0]["role"] == "user"  # the original prompt, no steering text
    pairs = _read(out / "pairs.jsonl")
    expected_pairs = {p for p, rows in by_prompt.items()
                      if pick(rows, +1)["scores"]["total"] > pick(rows, -1)["scores"]["total"]
                      and pick(rows, +1)["completion"].strip() != pick(rows, -1)["completion"].strip()}
    assert {pair["prompt_id"] for pair in pairs} == expected_pairs and pairs  # seeded: not vacuous
    for pair in pairs:
        assert validate_record(pair, "preference") == pair
        rows = by_prompt[pair["prompt_id"]]
        assert pair["metadata"]["chosen_sample_id"] == pick(rows, +1)["sample_id"]
        assert pair["metadata"]["rejected_sample_id"] == pick(rows, -1)["sample_id"]
    assert metrics["prompts"] == 3 and metrics["samples"] == 18 and metrics["best_kept"] == len(best)
    assert metrics["pairs"] == len(pairs)
    assert [g["samples"] for g in metrics["by_group"].values()] == [6, 6, 3, 3]
    assert metrics["samples_per_second"] > 0
    assert json.loads((out / "metrics.json").read_text())["samples"] == 18


@pytest.fixture(scope="module")
def reward_models(tiny_dir, tmp_path_factory):
    """An untrained one-score classifier on the tiny model, saved twice: with the policy's
    tokenizer, and with that tokenizer plus one added token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("reward_models")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    for name in ("same", "other"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    tokenizer.add_tokens(["<|extra_token|>"])
    tokenizer.save_pretrained(root / "other")
    return root / "same", root / "other"


@pytest.mark.slow
def test_reward_model_scores_are_the_scorers_on_the_original_prompt(tiny_dir, tmp_path, reward_models):
    """The recipe names the mismatched RM, the context the good one: the context's (this round's
    reward stage) wins. Each candidate's reward equals RewardScorer.score on (original prompt,
    completion), also for samples drawn under a system prompt (scored without it)."""
    from alignloop.reward.scoring import RewardScorer

    same, other = reward_models
    cfg = _recipe({"prompts": [{"builtin": "arithmetic", "count": 2}], "num_samples": 4,
                   "system_prompts": [None, SYSTEM], "max_new_tokens": 8, "reward_model": str(other),
                   "scoring": {"reward_model": 1.0}})
    out = tmp_path / "out"
    stage.run(cfg, _ctx(tiny_dir, tmp_path, reward_model=same), out)
    candidates = _read(out / "candidates.jsonl")
    originals = {c["prompt_id"]: c["prompt"] for c in candidates if c["system_prompt"] is None}
    expected = RewardScorer(same).score([originals[c["prompt_id"]] for c in candidates],
                                        [c["completion"] for c in candidates])
    assert [c["scores"]["reward_model"] for c in candidates] == pytest.approx(expected, abs=1e-5)
    assert [c["scores"]["total"] for c in candidates] == pytest.approx(expected, abs=1e-5)
    assert any(c["system_prompt"] == SYSTEM for c in candidates)


# ---- inputs refused before sampling -------------------------------------------------------------

@pytest.fixture()
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the stage started generating before checking its inputs")

    monkeypatch.setattr(stage, "open_generator", refuse)


def test_empty_prompt_file_is_a_stage_error(tiny_dir, tmp_path, no_generation):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    cfg = _recipe({"prompts": [{"path": str(empty)}], "num_samples": 2,
                   "scoring": {"reward_model": 0, "verifiers": {"arithmetic": 1.0}}})
    out = tmp_path / "out"
    with pytest.raises(StageError, match=r"round_1/rejection_sampling: no prompts.*prompts\.jsonl"):
        stage.run(cfg, _ctx(tiny_dir, tmp_path), out)
    assert not out.exists()


def test_reward_model_with_another_tokenizer_is_refused_before_sampling(tiny_dir, tmp_path,
                                                                       reward_models, no_generation):
    """The RM's tokenizer has 1 token more than the policy's (1024 -> 1025)."""
    _, other = reward_models
    cfg = _recipe({"prompts": [{"builtin": "arithmetic", "count": 2}], "num_samples": 2,
                   "reward_model": str(other), "scoring": {"reward_model": 1.0}})
    out = tmp_path / "out"
    with pytest.raises(StageError) as err:
        stage.run(cfg, _ctx(tiny_dir, tmp_path), out)
    message = str(err.value)
    assert str(other) in message and str(tiny_dir) in message
    assert "1025 tokens" in message and "1024 tokens" in message and "<|extra_token|>" in message
    assert not out.exists()


def test_unknown_verifier_module_is_refused_before_sampling(tiny_dir, tmp_path, no_generation):
    cfg = _recipe({"prompts": [{"builtin": "arithmetic", "count": 2}], "num_samples": 2,
                   "scoring": {"reward_model": 0, "verifiers": {"no_such_module_xyz:score": 1.0}}})
    with pytest.raises(StageError, match="no_such_module_xyz"):
        stage.run(cfg, _ctx(tiny_dir, tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_logprob_guard_passes_on_the_policy_and_stops_a_stale_generator(tiny_dir, tmp_path, monkeypatch):
    """generation.check_logprobs: the hf backend samples from the policy itself, so its log-probs
    match transformers' fp32 recomputation (within the tolerance) in both groups (one
    report per generate call). An engine holding other weights (the tiny model built with another
    seed, as a server left on last round's model would be) is stopped, with the stage named,
    before anything is written."""
    from alignloop.models.tiny import build_tiny

    cfg = load_recipe({"stages": ["rejection_sampling"], "generation": {"check_logprobs": True},
                       "rejection_sampling": {"prompts": [{"builtin": "arithmetic", "count": 2}],
                                              "num_samples": 4, "temperatures": [0.7, 1.0],
                                              "max_new_tokens": 8,
                                              "scoring": {"reward_model": 0, "verifiers": {"arithmetic": 1.0}}}},
                      check_trainer=False)
    metrics = stage.run(cfg, _ctx(tiny_dir, tmp_path), tmp_path / "out")
    assert [c["ok"] for c in metrics["logprob_check"]] == [True, True]
    assert all(c["max_abs_diff"] <= c["tolerance"] and c["tokens"] > 0 for c in metrics["logprob_check"])

    from alignloop.generation import backends

    other, real = str(build_tiny(seed=1)), backends.HFGenerator
    monkeypatch.setattr(backends, "HFGenerator", lambda model_dir, *args: real(other, *args))
    with pytest.raises(StageError, match="round_1/rejection_sampling: .*log-probs differ"):
        stage.run(cfg, _ctx(tiny_dir, tmp_path), tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
