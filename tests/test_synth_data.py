"""Synthetic Q&A: parsing, filters and dedup on crafted inputs; the stage with a scripted generator
(provenance, artifacts, errors); and the stage on the tiny model."""

import contextlib
import json
from collections import Counter

import pytest

from alignloop.config import RecipeError, load_recipe
from alignloop.data.contracts import validate_record
from alignloop.data.errors import DataError
from alignloop.data.source_config import SourceConfig
from alignloop.generation.backends import Sample
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.synth_data.config import SynthDataConfig
from alignloop.synth_data.parsing import parse_answer, parse_qa
from alignloop.data.readers import read_records
from alignloop.synth_data.seeds import Seed
from alignloop.synth_data.selection import Candidate, deduplicate, keep_top, rule_filter, score_filter
from alignloop.synth_data.templates import resolve_template

DOC = Seed("document", "docs.jsonl", {"id": "d1", "text": "The Golden Gate Bridge opened in 1937."})
PROMPT = Seed("prompt", "prompts.jsonl", {"prompt_id": "p1", "answer": 5,
                                          "prompt": [{"role": "user", "content": "What is 2 plus 3?"}]})


def cand(cid, answer, total=0.0, question="Q?", verifiers=None):
    scores = {"reward_model": None, "verifiers": verifiers or {}, "total": total}
    return Candidate(id=cid, seed=DOC, sample=0, question=question, answer=answer,
                     prompt=[{"role": "user", "content": question}], scores=scores)


def sample(text, finish="stop"):
    return Sample(text=text, token_ids=[], logprobs=None, finish_reason=finish)


# ---- parsing ----------------------------------------------------------------------------------

def test_parse_qa_reads_several_pairs():
    """Three pairs as the template asks, plus a preamble (ignored), numbering and `Question:` /
    `Answer:` spellings, and an answer continued on a second line: three pairs, no problems."""
    text = ("Here are three pairs.\n"
            "Q: When did the bridge open?\nA: In 1937.\n\n"
            "2. Question: Who designed it?\nAnswer: Joseph Strauss,\nwith Charles Ellis.\n"
            "q: How long is it?\na: 2,737 metres.")
    pairs, problems = parse_qa(text)
    assert pairs == [("When did the bridge open?", "In 1937."),
                     ("Who designed it?", "Joseph Strauss,\nwith Charles Ellis."),
                     ("How long is it?", "2,737 metres.")]
    assert problems == []


@pytest.mark.parametrize("text, finish, pattern, pairs, reasons", [
    # a Q: followed by another Q: has no answer; the second pair is fine
    ("Q: When?\nQ: Who?\nA: Strauss.", "stop", None, [("Who?", "Strauss.")], ["missing_answer"]),
    ("Q: When?\nA:   \n", "stop", None, [], ["empty_answer"]),
    ("Q:\nA: 1937.", "stop", None, [], ["empty_question"]),
    ("The bridge is red.", "stop", None, [], ["no_qa_lines"]),
    ("   \n", "stop", None, [], ["empty_output"]),
    ("Q: When?\nA: 1937.\nA: Or 1938.", "stop", None, [("When?", "1937.")], ["answer_without_question"]),
    # cut off at max_new_tokens: the complete first pair stays, the last piece is dropped
    ("Q: When?\nA: 1937.\nQ: Who?\nA: Joseph Str", "length", None, [("When?", "1937.")], ["truncated"]),
    ("The bridge is", "length", None, [], ["truncated"]),
    # the recipe wants answers that state a year
    ("Q: When?\nA: In 1937.\nQ: Who?\nA: Strauss.", "stop", r"\b\d{4}\b",
     [("When?", "In 1937.")], ["answer_pattern"]),
])
def test_parse_qa_reasons(text, finish, pattern, pairs, reasons):
    """Each crafted output gives the pairs it contains and one reason per unusable piece."""
    parsed = parse_qa(text, finish, pattern)
    assert parsed.pairs == pairs
    assert [reason for reason, _ in parsed.problems] == reasons


@pytest.mark.parametrize("text, finish, reason", [
    ("2+3=5, so the answer is 5.", "stop", None),
    ("2+3=5, so the answer", "length", "truncated"),
    ("  ", "stop", "empty_answer"),
    ("It is five.", "stop", "answer_pattern"),
])
def test_parse_answer(text, finish, reason):
    """A whole output is the answer to the seed prompt (question None), unless it was cut off,
    is empty, or lacks the pattern `answer is <number>`."""
    parsed = parse_answer(text, finish, r"answer is -?\d+")
    assert [r for r, _ in parsed.problems] == ([reason] if reason else [])
    assert parsed.pairs == ([] if reason else [(None, text)])


def test_parse_outputs_counts_malformed_by_reason():
    """Four samples of one document: 2 pairs; 1 pair + missing_answer; no_qa_lines; 1 pair +
    truncated. So 4 candidates, ids <seed>:<sample>:<pair>, and one malformed row per reason."""
    from alignloop.synth_data.stage import parse_outputs

    outputs = [[sample("Q: a?\nA: b.\nQ: c?\nA: d."), sample("Q: e?\nQ: f?\nA: g."),
                sample("I will not do that."), sample("Q: h?\nA: i.\nQ: j?\nA: k is", "length")]]
    candidates, malformed = parse_outputs([DOC], outputs, SynthDataConfig(samples_per_seed=4))
    assert [c.id for c in candidates] == ["d1:0:0", "d1:0:1", "d1:1:0", "d1:3:0"]
    assert [(c.question, c.answer) for c in candidates] == [("a?", "b."), ("c?", "d."), ("f?", "g."),
                                                            ("h?", "i.")]
    assert Counter(row["reason"] for row in malformed) == {"missing_answer": 1, "no_qa_lines": 1,
                                                           "truncated": 1}
    assert {row["sample"] for row in malformed} == {1, 2, 3}
    assert all(row["seed"] == {"kind": "document", "name": "docs.jsonl", "id": "d1"} for row in malformed)


def test_repeated_seed_numbers_its_samples_on():
    """A seed listed twice (weight 2) with 1 sample each gives samples 0 and 1: unique ids."""
    from alignloop.synth_data.stage import parse_outputs

    candidates, _ = parse_outputs([PROMPT, PROMPT], [[sample("It is 5.")], [sample("5.")]],
                                  SynthDataConfig())
    assert [c.id for c in candidates] == ["p1:0:0", "p1:1:0"]
    assert candidates[0].prompt == PROMPT.record["prompt"]
    assert candidates[0].question == "What is 2 plus 3?"


# ---- templates and config ---------------------------------------------------------------------

def test_generator_messages_fill_the_templates():
    """A document fills {document} and {n}; a prompt's last user turn fills {prompt}, and the
    recipe's system prompt replaces the seed's own (for the generator only)."""
    from alignloop.synth_data.stage import generator_messages

    section = SynthDataConfig(pairs_per_document=2, system_prompt="Be brief.",
                              prompt_template="{prompt} Show your work.")
    doc = generator_messages(DOC, resolve_template("qa_from_document", "document"), section)
    assert doc[0] == {"role": "system", "content": "Be brief."}
    assert "write 2 question-and-answer pairs" in doc[1]["content"]
    assert doc[1]["content"].endswith("Document:\nThe Golden Gate Bridge opened in 1937.")
    seed = Seed("prompt", "x", {"prompt_id": "p2", "prompt": [
        {"role": "system", "content": "You are a tutor."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 1+1?"}]})
    messages = generator_messages(seed, resolve_template(section.prompt_template, "prompt"), section)
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                        {"role": "user", "content": "What is 1+1? Show your work."}]


@pytest.mark.parametrize("section, key, message", [
    ({"document_template": "qa_from_docs"}, "synth_data.document_template",
     "unknown template 'qa_from_docs'"),
    ({"document_template": "answer_prompt"}, "synth_data.document_template", "renders prompt seeds"),
    ({"prompt_template": "{prompt} {answer}"}, "synth_data.prompt_template", "unknown field {answer}"),
    ({"prompt_template": "Answer: {}"}, "synth_data.prompt_template", "unknown field {}"),
    ({"document_template": "Summarise {title}"}, "synth_data.document_template", "needs a {document}"),
    ({"prompt_template": "{prompt} in {json}}"}, "synth_data.prompt_template", "not a valid format string"),
    ({"answer_pattern": "(\\d+"}, "synth_data.answer_pattern", "not a valid regular expression"),
    ({"top_fraction": 0.25}, "synth_data", "top_fraction needs a score"),
    ({"samples_per_seed": 4, "temperature": 0}, "synth_data", "temperature > 0"),
    ({"min_answer_length": 5, "max_answer_length": 3}, "synth_data", "below min_answer_length"),
])
def test_recipe_errors_name_the_key(section, key, message):
    """Each bad setting is one problem, reported at its key (a field) or at the section (a
    combination of keys), before anything runs."""
    spec = {"stages": ["synth_data"],
            "synth_data": {"prompts": [{"builtin": "arithmetic", "count": 4}], **section}}
    with pytest.raises(RecipeError) as err:
        load_recipe(spec, check_trainer=False)
    assert len(err.value.problems) == 1
    assert f"<dict>: {key}: " in err.value.problems[0] and message in err.value.problems[0]


# ---- documents --------------------------------------------------------------------------------

def test_documents_are_validated_with_file_line_and_field(tmp_path):
    """Line 1 is fine, line 2 has an empty text, line 3 an integer id (becomes "3"), line 4 a
    numeric title, line 5 is not JSON: raise names line 2; skip keeps lines 1 and 3."""
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join([
        json.dumps({"id": "a", "text": "Bridges.", "title": "B", "metadata": {"lang": "en"}}),
        json.dumps({"text": "  "}),
        json.dumps({"id": 3, "text": "Honey keeps."}),
        json.dumps({"text": "Tides.", "title": 5}),
        "{not json"]) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path, "document")
    assert str(err.value) == f"{path}:2: text: empty document"
    result = read_records(path, "document", on_error="skip")
    assert result.records == [{"id": "a", "text": "Bridges.", "title": "B", "metadata": {"lang": "en"}},
                              {"id": "3", "text": "Honey keeps."}]
    assert result.skipped == 3
    assert f"{path}:4: title: expected a string, got a number (5)" in result.reasons


# ---- filters ----------------------------------------------------------------------------------

def test_length_bounds_in_words_and_characters():
    """Answers of 1, 3 and 6 words with bounds [2, 5] words: only the 3-word one stays.
    In characters, "abcd" (4) is below 5 and "abcdefghijk" (11) above 10."""
    kept, dropped = rule_filter([cand("a", "yes"), cand("b", "in the 1930s"),
                                 cand("c", "it opened to traffic in 1937")], 2, 5, "words")
    assert [c.id for c in kept] == ["b"]
    assert [(d.candidate.id, d.reason) for d in dropped] == [("a", "too_short"), ("c", "too_long")]
    kept, dropped = rule_filter([cand("a", "abcd"), cand("b", "abcdefg"), cand("c", "abcdefghijk")],
                                5, 10, "chars")
    assert [c.id for c in kept] == ["b"]
    assert [d.reason for d in dropped] == ["too_short", "too_long"]


def test_verifier_min_score_and_top_fraction():
    """Totals a .9, b .1, c .5, d .7, e .3, f .95 with f's verifier at 0. Verifier filter (1.0)
    drops f whatever its total; min_score 0.2 drops b; the top half of the 4 left (ceil(0.5 * 4)
    = 2) is a and d, so c and e go as top_fraction. A quarter of 5 keeps ceil(1.25) = 2."""
    cands = [cand("a", "x", .9), cand("b", "x", .1), cand("c", "x", .5), cand("d", "x", .7),
             cand("e", "x", .3), cand("f", "x", .95, verifiers={"arithmetic": 0.0})]
    kept, dropped = score_filter(cands, min_verifier_score=1.0, min_score=0.2)
    assert [c.id for c in kept] == ["a", "c", "d", "e"]
    assert [(d.candidate.id, d.reason) for d in dropped] == [("b", "min_score"), ("f", "verifier:arithmetic")]
    kept, dropped = keep_top(kept, 0.5)
    assert [c.id for c in kept] == ["a", "d"]
    assert [(d.candidate.id, d.reason) for d in dropped] == [("c", "top_fraction"), ("e", "top_fraction")]
    assert [c.id for c in keep_top(cands[:5], 0.25)[0]] == ["a", "d"]


# ---- dedup ------------------------------------------------------------------------------------

Q = "What year did the Golden Gate Bridge open?"


def test_exact_duplicates_differ_only_in_case_and_whitespace():
    """x2 is x1 with other case and spacing and a higher total (0.5 > 0.3): x2 stays, x1 goes as
    its exact duplicate; the distinct y stays."""
    x1 = cand("x1", "It opened to traffic in 1937.", 0.3, question=Q)
    x2 = cand("x2", "it opened  to TRAFFIC in 1937.\n", 0.5,
              question="what year did the golden gate  bridge open?")
    y = cand("y", "Joseph Strauss was the chief engineer.", 0.1, question="Who designed the bridge?")
    kept, dropped = deduplicate([x1, x2, y], threshold=None)
    assert [c.id for c in kept] == ["x2", "y"]
    assert [(d.candidate.id, d.reason, d.duplicate_of) for d in dropped] == [("x1", "exact_duplicate", "x2")]


def test_near_duplicates_keep_the_higher_scored():
    """x1 and x3 differ in one word ("traffic" / "cars"). Question + answer is 14 words, 13
    bigrams; the changed word alters 2 of them, so they share 11 of 15 distinct bigrams:
    Jaccard 11/15 = 0.7333 >= 0.7, and x3 (total 0.8) beats x1 (0.5). y shares no bigram.
    At threshold 0.75 the pair is no longer a duplicate."""
    x1 = cand("x1", "It opened to traffic in 1937.", 0.5, question=Q)
    x3 = cand("x3", "It opened to cars in 1937.", 0.8, question=Q)
    y = cand("y", "Joseph Strauss was the chief engineer.", 0.1, question="Who designed the bridge?")
    kept, dropped = deduplicate([x1, x3, y], threshold=0.7, shingle_size=2)
    assert [c.id for c in kept] == ["x3", "y"]
    assert [(d.candidate.id, d.reason, d.duplicate_of, d.similarity) for d in dropped] == \
        [("x1", "near_duplicate", "x3", round(11 / 15, 4))]
    kept, dropped = deduplicate([x1, x3, y], threshold=0.75, shingle_size=2)
    assert [c.id for c in kept] == ["x1", "x3", "y"] and dropped == []


def test_near_dedup_matches_all_pairs_reference():
    """Prefix filtering only skips comparisons that cannot reach the threshold: on 300 random
    pairs (a third of them copies of an earlier one with one or two words changed, drawn from a
    small vocabulary so that many shingles are common), the kept set and each dropped pair's
    match equal those of a plain all-pairs greedy loop."""
    import random

    from alignloop.synth_data.selection import shingles

    rng = random.Random(0)
    vocab = ["the", "of", "is", "what", "bridge", "river", "year", "built", "long", "city"] + \
        [f"w{i}" for i in range(40)]
    cands = []
    for i in range(300):
        if cands and rng.random() < 0.33:
            words = rng.choice(cands).answer.split()
            for _ in range(rng.randint(1, 2)):
                words[rng.randrange(len(words))] = rng.choice(vocab)
        else:
            words = rng.choices(vocab, k=rng.randint(3, 14))
        cands.append(cand(f"c{i}", " ".join(words), round(rng.random(), 2), question="q"))
    for threshold in (0.5, 0.7, 0.9):
        kept, dropped = deduplicate(cands, threshold, shingle_size=2)
        expected_kept, expected_dropped = [], {}
        for c in sorted(cands, key=lambda c: (-c.total, int(c.id[1:]))):
            a = shingles(f"{c.question}\n{c.answer}", 2)
            scored = [(len(a & b) / len(a | b), k) for k, b in
                      ((k, shingles(f"{k.question}\n{k.answer}", 2)) for k in expected_kept)]
            best = max(scored, key=lambda s: s[0], default=None)
            if best is not None and best[0] >= threshold:
                expected_dropped[c.id] = best[0]
            else:
                expected_kept.append(c)
        assert {c.id for c in kept} == {c.id for c in expected_kept}
        assert {d.candidate.id: d.similarity for d in dropped} == \
            pytest.approx({k: round(v, 4) for k, v in expected_dropped.items()})


# ---- the stage with a scripted generator --------------------------------------------------------

class ScriptedGenerator:
    """Answers each request with the samples scripted for the first key found in its last turn."""

    def __init__(self, script, model_dir):
        self.script, self.model_dir, self.requests = script, model_dir, []

    def generate(self, prompts, settings):
        self.requests += prompts
        out = []
        for prompt in prompts:
            key = next(k for k in self.script if k in prompt[-1]["content"])
            out.append([sample(*s) for s in self.script[key]][:settings.n])
        return out

    def describe(self):
        return {"backend": "scripted", "model": self.model_dir}


@pytest.fixture()
def scripted(monkeypatch):
    """Replaces the stage's open_generator; `script` is set by the test."""
    import alignloop.synth_data.stage as stage

    state = {"script": {}, "opened": []}

    @contextlib.contextmanager
    def fake_open(gen_cfg, model_dir, dtype="float32"):
        gen = ScriptedGenerator(state["script"], model_dir)
        state["opened"].append(gen)
        yield gen

    monkeypatch.setattr(stage, "open_generator", fake_open)
    return state


def context(tmp_path, policy="policy-dir", reward_model=None):
    return StageContext(name="synth_data", round=1, policy=str(policy), base="base-dir",
                        work_dir=tmp_path / "work", log_dir=tmp_path / "logs", seed=1,
                        reward_model=reward_model)


def stage_run(cfg, ctx, out):
    from alignloop.synth_data.stage import run

    return run(cfg, ctx, out)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_stage_writes_rows_with_provenance(tmp_path, scripted):
    """Two documents, two samples each. Bridge: sample 0 has 2 good pairs; sample 1 repeats the
    first in other case and spacing (exact duplicate), the second with one word added (11 of its
    12 bigrams are the original's 11: Jaccard 11/12, a near duplicate; all totals are 0, so the
    earlier sample stays) and a question without answer. Honey: a refusal (no_qa_lines) and a
    cut-off output (truncated) whose complete first pair has a 1-word answer (too_short, min 2).
    Parsed 2 + 2 + 1 = 5 pairs; kept the 2 pairs of bridge sample 0."""
    docs = write_jsonl(tmp_path / "docs.jsonl", [
        {"id": "bridge", "text": "The Golden Gate Bridge opened in 1937, designed by Joseph Strauss."},
        {"id": "honey", "text": "Honey never spoils when it is sealed.", "metadata": {"topic": "food"}}])
    scripted["script"] = {
        "Golden Gate": [("Q: When did the Golden Gate Bridge open?\nA: It opened in 1937.\n"
                         "Q: Who designed the Golden Gate Bridge?\nA: It was designed by Joseph Strauss.",),
                        ("Q: when did the golden gate bridge OPEN?\nA: It opened in  1937.\n"
                         "Q: Who designed the Golden Gate Bridge?\n"
                         "A: It was designed by Joseph Strauss himself.\n"
                         "Q: How long is it?",)],
        "Honey": [("I would rather not.",),
                  ("Q: Does honey spoil?\nA: No.\nQ: Why not?\nA: Because", "length")],
    }
    cfg = load_recipe({"stages": ["synth_data"], "synth_data": {
        "documents": [{"path": str(docs)}], "samples_per_seed": 2, "min_answer_length": 2}},
        check_trainer=False)
    out = tmp_path / "out"
    metrics = stage_run(cfg, context(tmp_path), out)

    assert metrics["seeds"] == 2 and metrics["generated"] == 4 and metrics["parsed"] == 5
    assert metrics["malformed"] == {"missing_answer": 1, "no_qa_lines": 1, "truncated": 1}
    assert metrics["filtered"] == {"too_short": 1}
    assert metrics["duplicates"] == {"exact": 1, "near": 1}
    assert metrics["kept"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "dropped.jsonl", "metrics.json"]
    rows = read_jsonl(out / "data.jsonl")
    assert [r["messages"][0]["content"] for r in rows] == ["When did the Golden Gate Bridge open?",
                                                           "Who designed the Golden Gate Bridge?"]
    assert [r["id"] for r in rows] == ["synth-r1:bridge:0:0", "synth-r1:bridge:0:1"]
    for row in rows:
        assert validate_record(row, "chat") == row  # SFT reads them as chat records, metadata kept
    provenance = rows[0]["metadata"]["provenance"]
    assert provenance["source"] == {"kind": "document", "name": str(docs), "id": "bridge"}
    assert provenance["sample"] == 0 and provenance["round"] == 1
    assert provenance["template"] == "qa_from_document"
    assert provenance["generator"]["backend"] == "scripted"
    assert provenance["generator"]["model"] == "policy-dir"
    assert provenance["generator"]["sampling"]["n"] == 2 and provenance["generator"]["sampling"]["seed"] == 1
    assert provenance["scores"] == {"reward_model": None, "verifiers": {}, "total": 0}
    assert provenance["scorer"]["reward_model"] is None
    dropped = read_jsonl(out / "dropped.jsonl")
    assert Counter((d["category"], d["reason"]) for d in dropped) == {
        ("malformed", "missing_answer"): 1, ("malformed", "no_qa_lines"): 1, ("malformed", "truncated"): 1,
        ("filtered", "too_short"): 1, ("duplicate", "exact_duplicate"): 1, ("duplicate", "near_duplicate"): 1}
    near = next(d for d in dropped if d["reason"] == "near_duplicate")
    assert (near["id"], near["duplicate_of"], near["similarity"]) == \
        ("bridge:1:1", "bridge:0:1", round(11 / 12, 4))
    assert json.loads((out / "metrics.json").read_text())["kept"] == 2


def test_stage_prompts_filtered_by_final_answer(tmp_path, scripted):
    """Llama 3's math filter (reference A7): three samples per prompt, right (kept), wrong
    (verifier:arithmetic) and cut off (truncated). The kept row is the seed prompt as it was,
    with the verifier's score in its provenance."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt_id": "p1", "prompt": "What is 2 plus 3?", "answer": 5}])
    scripted["script"] = {"2 plus 3": [("2+3=5, so the answer is 5.",), ("so the answer is 6.",),
                                       ("2+3=", "length")]}
    cfg = load_recipe({"stages": ["synth_data"], "synth_data": {
        "prompts": [{"path": str(prompts)}], "samples_per_seed": 3,
        "prompt_template": "answer_step_by_step", "scoring": {"verifiers": {"arithmetic": 1.0}}}},
        check_trainer=False)
    metrics = stage_run(cfg, context(tmp_path), tmp_path / "out")
    assert (metrics["malformed"], metrics["filtered"], metrics["kept"]) == \
        ({"truncated": 1}, {"verifier:arithmetic": 1}, 1)
    request = scripted["opened"][0].requests[0]
    assert request[-1]["content"].startswith("What is 2 plus 3?\n\nWork through it step by step")
    row, = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert row["messages"] == [{"role": "user", "content": "What is 2 plus 3?"},
                               {"role": "assistant", "content": "2+3=5, so the answer is 5."}]
    provenance = row["metadata"]["provenance"]
    assert provenance["template"] == "answer_step_by_step"
    assert provenance["scores"]["verifiers"] == {"arithmetic": 1.0}
    assert provenance["source"] == {"kind": "prompt", "name": str(prompts), "id": "p1"}


def test_stage_keeps_the_reward_models_top_fraction(tmp_path, scripted, tiny_dir):
    """A reward model (the tiny Llama with a seeded random one-logit head) scores four distinct
    answers to one prompt; top_fraction 0.5 keeps ceil(0.5 * 4) = 2. Expected: the two highest
    of the four scores that RewardScorer gives the same (prompt, answer) pairs directly."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from alignloop.reward.scoring import RewardScorer

    torch.manual_seed(0)
    rm_dir = tmp_path / "rm"
    AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(rm_dir)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt_id": "p", "prompt": "Name a colour."}])
    answers = ["Red.", "Blue is a colour.", "Green, like grass.", "I like yellow best."]
    scripted["script"] = {"colour": [(a,) for a in answers]}
    cfg = load_recipe({"stages": ["synth_data"], "synth_data": {
        "prompts": [{"path": str(prompts)}], "samples_per_seed": 4, "top_fraction": 0.5,
        "scoring": {"reward_model": 1.0}}, "rejection_sampling": {"reward_model": str(rm_dir)}},
        check_trainer=False)
    # the reward model's vocabulary is checked against the policy's, as in rejection sampling
    metrics = stage_run(cfg, context(tmp_path, policy=str(tiny_dir), reward_model=rm_dir), tmp_path / "out")

    direct = RewardScorer(rm_dir).score([[{"role": "user", "content": "Name a colour."}]] * 4, answers)
    best_two = {answers[i] for i in sorted(range(4), key=lambda i: -direct[i])[:2]}
    rows = read_jsonl(tmp_path / "out" / "data.jsonl")
    assert metrics["kept"] == 2 and metrics["filtered"] == {"top_fraction": 2}
    assert {r["messages"][-1]["content"] for r in rows} == best_two
    for row in rows:
        provenance = row["metadata"]["provenance"]
        assert provenance["scores"]["reward_model"] == pytest.approx(
            direct[answers.index(row["messages"][-1]["content"])], abs=1e-5)
        assert provenance["scorer"]["reward_model"] == str(rm_dir)


def test_stage_errors_leave_nothing_behind(tmp_path, scripted):
    """No usable seeds (every document bad, bad_records: skip) and outputs that all fail to parse:
    each a StageError, and out_dir never exists; a reward-model weight without a reward model is
    a recipe error before anything runs."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": ""}, {"title": "no text"}])
    good = write_jsonl(tmp_path / "docs.jsonl", [{"id": "d", "text": "Tides follow the moon."}])
    out = tmp_path / "out"
    cases = [
        ({"bad_records": "skip", "synth_data": {"documents": [{"path": str(bad)}]}}, "no seeds"),
        ({"synth_data": {"documents": [{"path": str(good)}]}}, "no synthetic example was kept"),
    ]
    scripted["script"] = {"Tides": [("Tides are caused by the moon.",)]}
    for spec, message in cases:
        cfg = load_recipe({"stages": ["synth_data"], **spec}, check_trainer=False)
        with pytest.raises(StageError, match=message) as err:
            stage_run(cfg, context(tmp_path), out)
        assert not out.exists()
    assert "malformed {'no_qa_lines': 1}" in str(err.value)  # the counts say why
    # a reward-model weight with no reward model anywhere is caught when the recipe loads
    with pytest.raises(RecipeError, match="synth_data.scoring.reward_model: weight 1 but no reward model"):
        load_recipe({"stages": ["synth_data"], "synth_data": {
            "documents": [{"path": str(good)}], "scoring": {"reward_model": 1.0}}}, check_trainer=False)


# ---- the stage on the tiny model ----------------------------------------------------------------

def arithmetic_recipe(**synth):
    return load_recipe({"stages": ["synth_data"], "synth_data": {
        "prompts": [{"builtin": "arithmetic", "count": 12}], "samples_per_seed": 2,
        "temperature": 1.0, "max_new_tokens": 24, "scoring": {"verifiers": {"arithmetic": 1.0}},
        **synth}}, check_trainer=False)


@pytest.mark.slow
def test_stage_on_the_tiny_model(tmp_path, tiny_dir):
    """The untrained tiny model babbles: most of its 24 outputs run into max_new_tokens
    (truncated; measured here: 19 of 24). With verifiers only adding to the score
    (min_verifier_score: null), the ones that stop are kept unless they repeat; every output is
    accounted for exactly once."""
    out = tmp_path / "out"
    metrics = stage_run(arithmetic_recipe(min_verifier_score=None), context(tmp_path, tiny_dir), out)
    assert metrics["seeds"] == 12 and metrics["generated"] == 24
    assert metrics["malformed"].get("truncated", 0) > 0
    accounted = sum(metrics["malformed"].values()) + sum(metrics["filtered"].values()) \
        + sum(metrics["duplicates"].values()) + metrics["kept"]
    assert accounted == 24  # one answer per output in prompt mode
    rows, dropped = read_jsonl(out / "data.jsonl"), read_jsonl(out / "dropped.jsonl")
    assert len(rows) == metrics["kept"] >= 1 and len(dropped) == 24 - metrics["kept"]
    assert all(d["reason"] for d in dropped)
    assert all(validate_record(row, "chat") == row for row in rows)
    assert rows[0]["metadata"]["provenance"]["generator"]["model"] == str(tiny_dir)
    assert json.loads((out / "metrics.json").read_text())["kept"] == metrics["kept"]


@pytest.mark.slow
def test_stage_on_the_tiny_model_keeps_nothing_correct(tmp_path, tiny_dir):
    """Filtered by final answer (min_verifier_score 1.0), an untrained model keeps nothing: a
    StageError that gives the counts, and no out_dir. Same prompts and sampling as the test
    above, so the same outputs: the truncated ones and the ones that stopped (now
    verifier:arithmetic)."""
    out = tmp_path / "out"
    with pytest.raises(StageError, match="no synthetic example was kept: 12 seeds, 24 outputs") as err:
        stage_run(arithmetic_recipe(), context(tmp_path, tiny_dir), out)
    assert "truncated" in str(err.value) and "verifier:arithmetic" in str(err.value)
    assert not out.exists()
