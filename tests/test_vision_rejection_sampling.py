"""Vision rejection sampling (issue 4, item 5): K samples per image prompt, the argmax kept as
vision SFT data, best vs worst as vision preference pairs, every candidate written; the vision
reward model scores; a later sft trains on the kept samples; recipes are checked."""

import json
from pathlib import Path

import pytest
import torch

from alignloop.config import RecipeError, load_recipe
from alignloop.generation.common import Sample, SamplingSettings
from alignloop.generation.hf import sample_batches
from alignloop.pipeline.context import StageContext
from alignloop.vision import rejection_sampling as vrs

WORDS = ["purple", "circle", "", "red", "square", "left", "triangle", "blue", "right"]


def _recipe(tmp_path, stages, **sections):
    spec = {"output_dir": str(tmp_path / "run"), "model": {"path": "builtin:tiny"},
            "vision": {"adapter_config": {"encoder": "tiny", "cross_attention_every": 2},
                       "stages": stages, **sections}}
    return load_recipe(spec)


def _rs(count=12, **options):
    return {"prompts": [{"builtin": "shapes", "split": "train", "count": count}], "num_samples": 4,
            "temperatures": [1.0], "max_new_tokens": 4, "batch_size": 5,
            "scoring": {"reward_model": 0, "verifiers": {"shapes": 1.0}}, **options}


def _ctx(tmp_path, policy, reward_model=None):
    return StageContext(name="vision_rejection_sampling", round=1, policy=str(policy), base=str(policy),
                        seed=1, work_dir=tmp_path / ".work", log_dir=tmp_path / "logs",
                        reward_model=reward_model)


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _argmax(candidates, keep_truncated=False):
    """prompt_id -> sample_id of the highest total among non-empty (and, unless keep_truncated,
    complete) samples, ties to the lowest sample index: what the stage must keep."""
    best = {}
    for c in sorted(candidates, key=lambda c: int(c["sample_id"].rpartition(":")[2])):
        if not c["completion"].strip() or (c["finish_reason"] == "length" and not keep_truncated):
            continue
        if c["prompt_id"] not in best or c["scores"]["total"] > best[c["prompt_id"]]["scores"]["total"]:
            best[c["prompt_id"]] = c
    return {pid: c["sample_id"] for pid, c in best.items()}


def test_keeps_the_first_verified_answer_and_pairs_it_with_a_wrong_one(tmp_path, tiny_dir, monkeypatch):
    """Generation replaced by a fixed cycle over WORDS (one empty answer in 9), scored by the
    shapes verifier, with the text stage's rule: a prompt's best is its first sample that names
    the right answer (1.0); a prompt with no right sample keeps nothing (all_failed, where the
    old rule kept a wrong answer); a pair is the best vs a wrong non-empty answer."""
    drawn = iter(range(10_000))

    def fake(policy, tokenizer, prompts, settings, build_batch, batch_size, progress):
        return [[Sample(WORDS[next(drawn) % len(WORDS)], [], None, "stop") for _ in range(settings.n)]
                for _ in prompts]

    monkeypatch.setattr(vrs, "sample_batches", fake)
    cfg = _recipe(tmp_path, ["rejection_sampling"], rejection_sampling=_rs())
    metrics = vrs.run(cfg, _ctx(tmp_path, tiny_dir), tmp_path / "out")

    candidates = _rows(tmp_path / "out" / "candidates.jsonl")
    by_prompt = {}
    for c in candidates:
        by_prompt.setdefault(c["prompt_id"], []).append(c["sample_id"])
    assert len(by_prompt) == 12 and all(len(ids) == 4 for ids in by_prompt.values())
    assert all(sorted(ids) == [f"{pid}:{k}" for k in range(4)] for pid, ids in by_prompt.items())
    assert all(c["scores"]["verifiers"]["shapes"] == float(c["completion"] == c["answer"])
               for c in candidates)

    best = _rows(tmp_path / "out" / "best.jsonl")
    right = {c["prompt_id"] for c in candidates if c["scores"]["total"] == 1.0}
    assert right and len(right) < 12  # both cases happen
    expected = {pid: sid for pid, sid in _argmax(candidates).items() if pid in right}
    assert {b["metadata"]["prompt_id"]: b["id"] for b in best} == expected
    prompts = {c["prompt_id"]: c["prompt"] for c in candidates}
    for b in best:  # vision_chat: the prompt with its image path, then the kept answer
        assert b["messages"][:-1] == prompts[b["metadata"]["prompt_id"]]
        assert b["messages"][0]["content"][0]["type"] == "image"
        assert Path(b["messages"][0]["content"][0]["path"]).is_file()

    wrong = {c["prompt_id"] for c in candidates if c["completion"].strip() and c["scores"]["total"] == 0.0}
    pairs = _rows(tmp_path / "out" / "pairs.jsonl")
    assert {p["prompt_id"] for p in pairs} == right & wrong
    assert all(p["metadata"]["chosen_score"] > p["metadata"]["rejected_score"] for p in pairs)
    assert metrics["best_kept"] == len(best) == len(right) and metrics["pairs"] == len(pairs)
    assert metrics["skipped"]["empty_sample"] == sum(not c["completion"] for c in candidates) > 0
    assert metrics["skipped"]["all_failed"] == 12 - len(right)
    assert metrics["skipped"]["pair_none_failed"] == len(right - wrong)


def test_samples_from_the_model_reproducibly(tmp_path, tiny_dir):
    """Real sampling from the (untrained) tiny vision model: K rows per prompt, the sampling
    settings recorded, the same candidates on a rerun with the same seed."""
    cfg = _recipe(tmp_path, ["rejection_sampling"],
                  rejection_sampling=_rs(count=4, num_samples=3, keep_truncated=True,
                                         min_verifier_score=None))  # untrained: all fail
    first = vrs.run(cfg, _ctx(tmp_path, tiny_dir), tmp_path / "a")
    vrs.run(cfg, _ctx(tmp_path, tiny_dir), tmp_path / "b")
    a, b = _rows(tmp_path / "a" / "candidates.jsonl"), _rows(tmp_path / "b" / "candidates.jsonl")
    assert len(a) == 12 and [c["completion"] for c in a] == [c["completion"] for c in b]
    assert len({c["completion"] for c in a}) > 1  # sampled, not greedy
    assert a[0]["generator"]["temperature"] == 1.0 and a[0]["generator"]["n"] == 3
    best = _rows(tmp_path / "a" / "best.jsonl")
    assert {r["metadata"]["prompt_id"]: r["id"] for r in best} == _argmax(a, keep_truncated=True)
    assert first["samples"] == 12 and first["best_kept"] == 4


def test_vision_sampling_draws_what_a_plain_mllama_generate_draws(tmp_path, tiny_dir):
    """`sample_batches` on the tiny vision model as transformers' Mllama, over the vision_prompt
    collator's batches, gives token for token what `generate` itself gives on the same batches
    when seeded as sample_batches documents (the seed once, then batch after batch; the
    generation stop ids): 5 prompts in batches of 3 and 2, n = 3 at T = 1, top_p 0.9."""
    from alignloop.data.sources import load_sources
    from alignloop.generation.common import cut_at_stop, stop_token_ids
    from alignloop.vision.convert import to_mllama
    from alignloop.vision.data import VisionCollator
    from alignloop.vision.loading import image_processor_for, load_vision_model, load_vision_tokenizer

    cfg = _recipe(tmp_path, ["rejection_sampling"], rejection_sampling=_rs(count=5))
    tokenizer = load_vision_tokenizer(cfg, str(tiny_dir))
    model = load_vision_model(cfg, str(tiny_dir), tokenizer).eval()
    collator = VisionCollator(tokenizer, image_processor_for(cfg, model), "vision_prompt")
    policy = to_mllama(model)
    records = load_sources(cfg.vision.rejection_sampling.prompts, "vision_prompt").records
    settings = SamplingSettings(n=3, max_new_tokens=6, temperature=1.0, top_p=0.9, seed=7)
    drawn = sample_batches(policy, tokenizer, records, settings, collator, batch_size=3, progress=False)

    stops = stop_token_ids(tokenizer, policy.generation_config.eos_token_id)
    expected = []
    torch.manual_seed(7)
    for first in (0, 3):
        batch = {k: v for k, v in collator(records[first:first + 3]).items() if k != "labels"}
        with torch.no_grad():
            out = policy.generate(**batch, do_sample=True, temperature=1.0, top_p=0.9,
                                  num_return_sequences=3, max_new_tokens=6, eos_token_id=stops,
                                  pad_token_id=tokenizer.pad_token_id)  # (B * 3, L + new)
        expected += [cut_at_stop(row, stops)[0] for row in out[:, batch["input_ids"].shape[1]:].tolist()]
    assert [len(group) for group in drawn] == [3] * 5
    assert [s.token_ids for group in drawn for s in group] == expected
    assert len({tuple(ids) for ids in expected}) > 1  # sampled, not one greedy answer
    assert all(s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True) and s.logprobs is None
               for group in drawn for s in group)


def test_vllm_backends_are_refused_before_anything_is_loaded(tmp_path):
    """vLLM no longer runs Mllama (docs/vision.md): generation.backend vllm or vllm_server in a
    vision recipe with rejection sampling is a recipe error naming the key, and the stage refuses
    a config built in code before any model loads."""
    from alignloop.pipeline.errors import StageError

    spec = {"model": {"path": "builtin:tiny"}, "vision": {"stages": ["rejection_sampling"],
                                                          "rejection_sampling": _rs()}}
    with pytest.raises(RecipeError, match="generation.backend: vllm_server: vision rejection sampling"):
        load_recipe({**spec, "generation": {"backend": "vllm_server", "server_url": "http://x:1"}})
    for backend in ("vllm", "vllm_server"):
        cfg = _recipe(tmp_path, ["rejection_sampling"], rejection_sampling=_rs())
        cfg.generation.backend = backend
        with pytest.raises(StageError, match=f"generation.backend {backend}: vision rejection sampling"):
            vrs.run(cfg, _ctx(tmp_path, tmp_path / "no_model"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_vision_reward_model_scores_the_samples(tmp_path, tiny_dir):
    """A vision reward model on disk (fresh score head on the tiny vision model, saved as the
    vision_reward stage saves it): each candidate's reward equals the model's own score of
    (prompt, answer) (an empty answer gets none), and the kept answer is the one it scores highest."""
    from alignloop.vision.data import VisionCollator
    from alignloop.vision.reward import VisionRewardModel, save_score
    from alignloop.vision.loading import (image_processor_for, load_vision_model, load_vision_tokenizer,
                                          save_vision_model)

    cfg = _recipe(tmp_path, ["rejection_sampling"], rejection_sampling=_rs(
        count=3, num_samples=3, keep_truncated=True, reward_model=str(tmp_path),
        scoring={"reward_model": 1.0}))
    tokenizer = load_vision_tokenizer(cfg, str(tiny_dir))
    vision = load_vision_model(cfg, str(tiny_dir), tokenizer)
    torch.manual_seed(0)
    rm = VisionRewardModel(vision).eval()
    processor = image_processor_for(cfg, vision)
    save_vision_model(vision, tokenizer, processor, tmp_path / "rm")
    save_score(rm, tmp_path / "rm")

    vrs.run(cfg, _ctx(tmp_path, tiny_dir, reward_model=tmp_path / "rm"), tmp_path / "out")
    candidates = _rows(tmp_path / "out" / "candidates.jsonl")
    collator = VisionCollator(tokenizer, processor, "vision_chat")
    answered = [c for c in candidates if c["completion"].strip()]
    with torch.no_grad():
        expected = rm(**collator([{"id": c["sample_id"], "messages": c["prompt"] + [
            {"role": "assistant", "content": [{"type": "text", "text": c["completion"]}]}]}
            for c in answered])).tolist()
    assert [c["scores"]["reward_model"] for c in answered] == pytest.approx(expected, abs=1e-4)
    assert all(c["scores"]["reward_model"] is None for c in candidates if c not in answered)
    best = _rows(tmp_path / "out" / "best.jsonl")
    assert {r["metadata"]["prompt_id"]: r["id"] for r in best} == _argmax(candidates, keep_truncated=True)


def test_vision_rejection_sampling_recipes_are_checked(tmp_path):
    base = {"model": {"path": "builtin:tiny"}}

    def load(stages, **sections):
        return load_recipe({**base, "vision": {"stages": stages, **sections}})

    with pytest.raises(RecipeError, match=r"vision.rejection_sampling.num_samples: building best/worst "
                                          r"pairs needs at least 2"):
        load(["rejection_sampling"], rejection_sampling=_rs(num_samples=1))
    assert load(["rejection_sampling"], rejection_sampling=_rs(num_samples=1, pairs=False))
    with pytest.raises(RecipeError, match=r"vision.rejection_sampling.scoring.reward_model: weight 1 "
                                          r"but no vision reward model"):
        load(["rejection_sampling"], rejection_sampling=_rs(scoring={"verifiers": {"shapes": 1.0}}))
    with pytest.raises(RecipeError, match=r"vision.rejection_sampling.scoring: nothing scores"):
        load(["rejection_sampling"], rejection_sampling=_rs(scoring={"reward_model": 0}))
    with pytest.raises(RecipeError, match=r"vision.rejection_sampling.prompts: rejection sampling needs"):
        load(["rejection_sampling"], rejection_sampling={**_rs(), "prompts": []})
    with pytest.raises(RecipeError, match="reward must run before rejection_sampling"):
        load(["rejection_sampling", "reward"], rejection_sampling=_rs(),
             reward={"data": [{"builtin": "shapes", "split": "train", "count": 8}]})
    # sft and dpo after rejection sampling need no data of their own; before it they do
    assert load(["rejection_sampling", "sft", "dpo"], rejection_sampling=_rs())
    with pytest.raises(RecipeError, match="vision.sft.data: the vision sft stage needs"):
        load(["sft", "rejection_sampling"], rejection_sampling=_rs())
    with pytest.raises(RecipeError, match="vision.sft.kind: an sft after rejection_sampling"):
        load(["rejection_sampling", "sft"], rejection_sampling=_rs(), sft={"kind": "image_text"})


def test_plan_wires_the_reward_model_and_the_samples_downstream(tmp_path):
    """[adapter, reward, rejection_sampling, sft, dpo]: RS is scored by the reward stage's model
    and changes neither the policy nor the reward model; sft reads best.jsonl, dpo pairs.jsonl;
    their keys change when the rejection-sampling section does."""
    from alignloop.pipeline.plan import plan

    data = [{"builtin": "shapes", "split": "train", "count": 8}]
    sections = dict(adapter={"data": data}, reward={"data": data},
                    rejection_sampling=_rs(scoring={"reward_model": 1.0}))
    cfg = _recipe(tmp_path, ["adapter", "reward", "rejection_sampling", "sft", "dpo"], **sections)
    steps, _ = plan(cfg, tmp_path / "run")
    ctx = {s.ctx.name: s.ctx for s in steps}
    stage_dir = tmp_path / "run" / "round_1"
    assert ctx["vision_rejection_sampling"].reward_model == stage_dir / "vision_reward" / "model"
    assert ctx["vision_rejection_sampling"].policy == str(stage_dir / "vision_adapter" / "model")
    assert ctx["vision_sft"].policy == str(stage_dir / "vision_adapter" / "model")
    assert ctx["vision_sft"].inputs == {"rs_best": [stage_dir / "vision_rejection_sampling" / "best.jsonl"]}
    assert ctx["vision_dpo"].inputs == {"rs_pairs": [stage_dir / "vision_rejection_sampling" / "pairs.jsonl"]}
    other = _recipe(tmp_path, ["adapter", "reward", "rejection_sampling", "sft", "dpo"],
                    **{**sections, "rejection_sampling": _rs(scoring={"reward_model": 1.0}, num_samples=6)})
    keys = {s.ctx.name: s.key for s in steps}
    changed = {s.ctx.name: s.key for s in plan(other, tmp_path / "run")[0]}
    assert [n for n in keys if keys[n] != changed[n]] == ["vision_rejection_sampling", "vision_sft",
                                                          "vision_dpo"]


def test_adapter_then_rejection_sampling_then_sft_trains_on_the_kept_samples(tmp_path, capsys):
    """The shapes demo, tiny: adapter -> rejection_sampling (the shapes verifier) -> sft with no
    data of its own. SFT trains on exactly the best samples RS kept; a rerun skips every stage.
    The adapter's one epoch rarely names a shape right, so the verifier only scores here
    (min_verifier_score None) and every prompt keeps its argmax: this test is about the hand-off."""
    from alignloop.pipeline.runner import run

    train = dict(per_device_train_batch_size=8, learning_rate=3.0e-3, num_train_epochs=1,
                 logging_steps=1, save_steps=100, max_length=64)
    sections = dict(adapter={"data": [{"builtin": "shapes", "split": "train", "count": 32}], **train},
                    rejection_sampling=_rs(count=8, num_samples=2, keep_truncated=True,
                                           min_verifier_score=None),
                    sft={"train": ["cross_attention"], **train})
    cfg = _recipe(tmp_path, ["adapter", "rejection_sampling", "sft"], **sections)
    result = run(cfg)
    rs = result.stages["round_1/vision_rejection_sampling"].metrics
    sft_dir = tmp_path / "run" / "round_1" / "vision_sft"
    kept = _rows(tmp_path / "run" / "round_1" / "vision_rejection_sampling" / "best.jsonl")
    assert rs["best_kept"] == len(kept) == 8
    trained_on = _rows(sft_dir / "data.jsonl")
    assert len(trained_on) == rs["best_kept"]
    assert sorted(r["id"] for r in trained_on) == sorted(r["id"] for r in kept)
    sft = json.loads((sft_dir / "metrics.json").read_text())
    assert [d["used"] for d in sft["data"]] == [8] and sft["steps"] == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["round_1/vision_rejection_sampling"]["status"] == "complete"
    again = run(_recipe(tmp_path, ["adapter", "rejection_sampling", "sft"], **sections))
    assert all(stage.skipped for stage in again.stages.values())


def test_the_reward_stage_scores_and_dpo_trains_on_the_pairs(tmp_path):
    """[adapter, reward, rejection_sampling, dpo] in one run: the samples are scored by the
    reward stage's model (a reward on every answer that is not empty, none from verifiers), and DPO, with no
    data of its own, trains on exactly the pairs kept."""
    from alignloop.pipeline.runner import run

    train = dict(per_device_train_batch_size=8, learning_rate=3.0e-3, num_train_epochs=1,
                 logging_steps=1, save_steps=100, max_length=64)
    data = [{"builtin": "shapes", "split": "train", "count": 16}]
    cfg = _recipe(tmp_path, ["adapter", "reward", "rejection_sampling", "dpo"],
                  adapter={"data": data, **train}, reward={"data": data, **train},
                  rejection_sampling=_rs(count=6, num_samples=3, keep_truncated=True,
                                         scoring={"reward_model": 1.0}),
                  dpo={"train": ["cross_attention"], **train})
    result = run(cfg)
    stage_dir = tmp_path / "run" / "round_1"
    candidates = _rows(stage_dir / "vision_rejection_sampling" / "candidates.jsonl")
    assert len(candidates) == 18
    assert all(isinstance(c["scores"]["reward_model"], float) == bool(c["completion"].strip())
               and c["scores"]["verifiers"] == {} for c in candidates)  # empty answers get none
    assert sum(isinstance(c["scores"]["reward_model"], float) for c in candidates) >= 12
    rs = result.stages["round_1/vision_rejection_sampling"].metrics
    assert rs["scoring"]["reward_model"] == str(stage_dir / "vision_reward" / "model")
    pairs = _rows(stage_dir / "vision_rejection_sampling" / "pairs.jsonl")
    assert rs["pairs"] == len(pairs) > 0
    trained_on = _rows(stage_dir / "vision_dpo" / "data.jsonl")
    assert sorted(r["prompt_id"] for r in trained_on) == sorted(p["prompt_id"] for p in pairs)
