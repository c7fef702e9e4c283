"""The loop as one resumable command: rounds of stages, keys that chain, kill -9 and resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignloop.config import load_recipe
from alignloop.pipeline.runner import plan, read_manifest
from conftest import kill_at_first_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "alignloop.cli"]


def loop_recipe(tmp_path, name="run", **extra):
    """Round 0: SFT on arithmetic; rounds 1-2: rejection sampling from the policy (verifier
    scoring), SFT on the best samples, DPO on best-vs-worst pairs; evaluation after each round.
    Round 0's 30 steps rarely make a right answer, so the verifier scores without filtering
    (min_verifier_score None) and every round has samples to train on: these tests are about the
    loop's plumbing, tests/test_rejection_sampling.py about the selection rule."""
    spec = {
        "seed": 0,
        "output_dir": str(tmp_path / name),
        "model": {"tiny": {"initializer_range": 0.1}},
        "rounds": 2,
        "initial_sft": {"data": [{"builtin": "arithmetic", "count": 256}], "max_steps": 30,
                        "learning_rate": 3e-3},
        "stages": ["rejection_sampling", "sft", "dpo"],
        "rejection_sampling": {"prompts": [{"builtin": "arithmetic", "count": 8}], "num_samples": 4,
                               "temperatures": [1.0], "max_new_tokens": 40, "min_verifier_score": None,
                               "scoring": {"reward_model": 0, "verifiers": {"arithmetic": 1.0}}},
        "sft": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                "logging_steps": 2, "save_steps": 4, "max_length": 96,
                "activation_checkpointing": False, "disable_tqdm": True},
        "dpo": {"data": [], "max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-4,
                "logging_steps": 2, "save_steps": 3, "max_length": 128,
                "activation_checkpointing": False, "disable_tqdm": True},
        "evaluation": {"task": "arithmetic", "max_new_tokens": 40,
                       "data": [{"builtin": "arithmetic", "split": "heldout", "count": 16}]},
    }
    spec["initial_sft"].update({k: v for k, v in spec["sft"].items() if k not in spec["initial_sft"]})
    spec.update(extra)
    return spec


def keys(spec, tmp_path, *overrides):
    cfg = load_recipe(spec, list(overrides), check_trainer=False)
    steps, _ = plan(cfg, Path(cfg.output_dir))
    return {s.ctx.label: s.key for s in steps}, {s.ctx.label: s.ctx for s in steps}


def test_plan_lays_out_rounds_and_inputs(tmp_path, alignloop_cache):
    """Round 0 is the initial SFT; each round samples from the policy the previous round ended
    with; SFT reads every round's best samples so far (rejection_sampled: all), DPO only the
    newest round's pairs (Llama 3: the latest batches)."""
    _, ctx = keys(loop_recipe(tmp_path), tmp_path)
    run = tmp_path / "run"
    assert list(ctx) == ["round_0/sft", "round_1/rejection_sampling", "round_1/sft", "round_1/dpo",
                         "round_2/rejection_sampling", "round_2/sft", "round_2/dpo"]
    assert ctx["round_1/rejection_sampling"].policy == str(run / "round_0/sft/model")
    assert ctx["round_2/rejection_sampling"].policy == str(run / "round_1/dpo/model")
    assert ctx["round_1/dpo"].policy == str(run / "round_1/sft/model")
    assert ctx["round_2/sft"].inputs["rs_best"] == [run / "round_1/rejection_sampling/best.jsonl",
                                                    run / "round_2/rejection_sampling/best.jsonl"]
    assert ctx["round_2/dpo"].inputs["rs_pairs"] == [run / "round_2/rejection_sampling/pairs.jsonl"]
    assert [ctx[label].seed for label in ("round_0/sft", "round_1/sft", "round_2/sft")] == [0, 1, 2]
    # a LoRA stage whose model a later stage loads writes merged/; nothing loads the last one
    assert ctx["round_1/dpo"].merge and not ctx["round_2/dpo"].merge


def test_sft_start_base_and_newest_best_samples(tmp_path, alignloop_cache):
    spec = loop_recipe(tmp_path)
    spec["sft"].update(start="base", rejection_sampled="newest")
    _, ctx = keys(spec, tmp_path)
    base = ctx["round_0/sft"].base
    assert ctx["round_0/sft"].policy == base and ctx["round_2/sft"].policy == base
    assert ctx["round_2/sft"].inputs["rs_best"] == [tmp_path / "run/round_2/rejection_sampling/best.jsonl"]


def test_a_changed_stage_changes_its_key_and_every_key_downstream(tmp_path, alignloop_cache):
    """Keys chain through what a stage consumes: the policy, the reward model, the artifacts."""
    spec = loop_recipe(tmp_path)
    before, _ = keys(spec, tmp_path)
    assert before == keys(spec, tmp_path)[0]  # deterministic
    after, _ = keys(spec, tmp_path, "dpo.beta=0.2")
    changed = {label for label in before if before[label] != after[label]}
    assert changed == {"round_1/dpo", "round_2/rejection_sampling", "round_2/sft", "round_2/dpo"}
    after, _ = keys(spec, tmp_path, "rejection_sampling.num_samples=6")
    changed = {label for label in before if before[label] != after[label]}
    assert changed == set(before) - {"round_0/sft"}
    after, _ = keys(spec, tmp_path, "evaluation.max_new_tokens=20")
    assert after == before  # evaluation settings do not retrain anything


def small_loop(tmp_path, name):
    """Round 0 SFT, then one round of every training kind: reward -> rejection sampling
    (RM + verifier) -> SFT with checkpoints every 4 steps -> DPO; evaluation after each round."""
    spec = loop_recipe(tmp_path, name, rounds=1, stages=["reward", "rejection_sampling", "sft", "dpo"])
    spec["rejection_sampling"]["scoring"] = {"reward_model": 0.5, "verifiers": {"arithmetic": 1.0}}
    spec["reward"] = {"init": "policy", "data": [{"builtin": "arithmetic", "count": 64}],
                      "max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                      "logging_steps": 2, "save_steps": 100, "max_length": 128,
                      "activation_checkpointing": False, "disable_tqdm": True}
    spec["dpo"]["data"] = [{"builtin": "arithmetic", "count": 32}]
    spec["evaluation"]["reward"] = True
    path = tmp_path / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def final_state(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "round_1" / "dpo" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_kill_9_in_a_training_stage_then_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL while round_1/sft trains; the same command again skips the complete stages,
    continues SFT from its last checkpoint, runs DPO and the evaluation, and ends with the same
    weights and metrics as a run that was never interrupted. The manifest's attempts show that
    no stage started from scratch twice."""
    straight, killed = small_loop(tmp_path, "a"), small_loop(tmp_path, "b")
    out = subprocess.run([*CLI, "run", str(straight)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]

    kill_at_first_checkpoint([*CLI, "run", str(killed)],
                             tmp_path / "b" / ".work" / "round_1" / "sft" / "checkpoints", ROOT)
    assert not (tmp_path / "b" / "round_1" / "sft").exists()  # no half-written stage directory
    done_before = set(read_manifest(tmp_path / "b")["stages"])
    assert done_before == {"round_0/sft", "round_1/reward", "round_1/rejection_sampling"}

    out = subprocess.run([*CLI, "run", str(killed)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = read_manifest(tmp_path / "b")
    for label, record in manifest["stages"].items():
        fresh = [a for a in record["attempts"] if not a["checkpoints"]]
        assert len(fresh) == 1, (label, record["attempts"])  # started from scratch once
    sft_attempts = manifest["stages"]["round_1/sft"]["attempts"]
    assert len(sft_attempts) == 2 and "checkpoint-" in sft_attempts[1]["resumed_from"]

    a, b = final_state(tmp_path / "a"), final_state(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    ev_a = json.loads((tmp_path / "a" / "round_1" / "eval" / "metrics.json").read_text())["summary"]
    ev_b = json.loads((tmp_path / "b" / "round_1" / "eval" / "metrics.json").read_text())["summary"]
    assert ev_a.keys() >= {"accuracy", "reward_mean", "win_rate"}
    for key in ev_a:
        assert ev_b[key] == pytest.approx(ev_a[key], abs=1e-4), key
    assert (tmp_path / "b" / "report.md").is_file() and (tmp_path / "b" / "report.png").is_file()


def test_evaluation_after_the_last_round_only(tmp_path, alignloop_cache):
    """evaluation.rounds: last evaluates the starting model and the final round, nothing in
    between; the last round is compared with the base (its previous evaluated point), and the
    report lists every round with metrics only where an evaluation ran."""
    from alignloop.pipeline.report import rows
    from alignloop.pipeline.runner import run

    spec = loop_recipe(tmp_path, rounds=2, stages=["rejection_sampling", "sft"])
    spec["initial_sft"]["max_steps"] = 6
    spec["sft"]["max_steps"] = 2
    spec["evaluation"].update(rounds="last", reward=False)
    run(spec)
    out = tmp_path / "run"
    assert (out / "base_eval" / "metrics.json").is_file()
    assert not (out / "round_0" / "eval").exists() and not (out / "round_1" / "eval").exists()
    last = json.loads((out / "round_2" / "eval" / "metrics.json").read_text())
    assert "accuracy" in last["summary"]
    table = {row["label"]: row for row in rows(out)}
    assert list(table) == ["base", "round_0", "round_1", "round_2"]
    assert table["round_1"].get("accuracy") is None and table["round_2"]["accuracy"] == last["summary"]["accuracy"]


def test_stage_ablation_evaluates_sft_before_dpo(tmp_path, alignloop_cache):
    """evaluation.stage_ablation: round 1 also evaluates SFT's model (before DPO) into
    round_1/eval_sft; the report compares round_1 with it (DPO's own contribution, the paired
    bootstrap of the two answer files) and it with round_0; a rerun evaluates nothing again."""
    from alignloop.evaluation.stats import pair_answers, paired_bootstrap
    from alignloop.pipeline.runner import run

    spec = loop_recipe(tmp_path, rounds=1)
    spec["initial_sft"]["max_steps"] = 6
    spec["sft"]["max_steps"] = 2
    spec["dpo"]["data"] = [{"builtin": "arithmetic", "count": 32}]  # pairs even when RS keeps none
    spec["evaluation"].update(stage_ablation=True, reward=False, before=False)
    run(spec)
    out = tmp_path / "run"
    inside = json.loads((out / "round_1" / "eval_sft" / "metrics.json").read_text())
    final = json.loads((out / "round_1" / "eval" / "metrics.json").read_text())
    assert Path(inside["policy"]).parent == out / "round_1" / "sft"
    assert Path(final["policy"]).parent == out / "round_1" / "dpo"
    assert inside["seconds"] > 0 and final["seconds"] > 0

    report = json.loads((out / "report.json").read_text())
    assert [row["label"] for row in report["rows"]] == ["round_0", "round_1.sft", "round_1"]
    changes = {(c["point"], c["against"]): c for c in report["changes"]}
    assert list(changes) == [("round_1.sft", "round_0"), ("round_1", "round_0"), ("round_1", "round_1.sft")]

    def answers(name):
        return [json.loads(line) for line in (out / "round_1" / name / "answers.jsonl").read_text().splitlines()]

    pairs = pair_answers(answers("eval_sft"), answers("eval"))
    direct = paired_bootstrap([a.get("correct") for a, _ in pairs if a["kind"] == "task"],
                              [b.get("correct") for _, b in pairs if b["kind"] == "task"])
    assert changes[("round_1", "round_1.sft")]["accuracy"] == direct.__dict__
    assert "| round_1 vs round_1.sft |" in (out / "report.md").read_text()

    stamp = (out / "round_1" / "eval_sft" / "metrics.json").stat().st_mtime_ns
    run(spec)
    assert (out / "round_1" / "eval_sft" / "metrics.json").stat().st_mtime_ns == stamp


def test_prune_and_distill_run_once_in_round_0_before_the_initial_sft(tmp_path, alignloop_cache):
    """`stages: [prune, distill, rejection_sampling, sft]` with initial_sft: round 0 is prune ->
    distill -> SFT, each starting from the model the one before it wrote; rounds 1-2 sample from
    the policy and fine-tune, and never prune or distill again. The teacher stays the recipe's
    model (ctx.base)."""
    spec = loop_recipe(tmp_path)
    spec["stages"] = ["prune", "distill", "rejection_sampling", "sft"]
    spec["prune"] = {"importance": "random", "target": {"num_hidden_layers": 2}}
    spec["distill"] = {"data": [{"builtin": "arithmetic", "count": 8}]}
    cfg = load_recipe(spec, check_trainer=False)
    steps, rounds = plan(cfg, Path(cfg.output_dir))
    ctx = {s.ctx.label: s.ctx for s in steps}
    run = tmp_path / "run"
    assert list(ctx) == ["round_0/prune", "round_0/distill", "round_0/sft",
                         "round_1/rejection_sampling", "round_1/sft",
                         "round_2/rejection_sampling", "round_2/sft"]
    assert ctx["round_0/distill"].policy == str(run / "round_0/prune/model")
    assert ctx["round_0/sft"].policy == str(run / "round_0/distill/model")
    assert ctx["round_0/distill"].base == ctx["round_0/prune"].policy  # the unpruned teacher
    assert rounds[0]["stage_policies"][:2] == [("prune", str(run / "round_0/prune/model"), steps[0].key),
                                                ("distill", str(run / "round_0/distill/model"), steps[1].key)]
    assert ctx["round_1/rejection_sampling"].policy == rounds[0]["policy"]
