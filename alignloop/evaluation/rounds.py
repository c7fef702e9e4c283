"""Evaluating the policy after a round (and the starting model): what the report plots.

    <run>/round_<k>/eval/metrics.json   {"key", "label", "summary": {...}, "task", "safety", "reward"}
    <run>/round_<k>/eval/answers.jsonl  one row per held-out prompt: the policy's greedy answer
    <run>/base_eval/...                 the same for the starting model

summary: `accuracy` (task verifier on evaluation.data), `vr` / `frr` (safety.eval_data through
the safety classifier, reference A8), `reward_mean` (the round's reward model on every answer)
and `win_rate` (that reward model: this round's answers against the previous evaluation's
answers to the same prompts). Numbers go through the `evaluate` metric modules in metrics/.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from alignloop.config import Recipe

logger = logging.getLogger("alignloop.evaluation")


def eval_dir(run_dir: Path, label: str) -> Path:
    return run_dir / "base_eval" if label == "base" else run_dir / label / "eval"


def evaluate_round(cfg: Recipe, run_dir: Path, label: str, policy: dict | None,
                   reward: dict | None, previous: str | None = None) -> dict:
    """Evaluates `policy` ({"path", "key"}; None: the recipe's model) and writes eval_dir(label).

    Skipped when metrics.json exists under the same key (policy, reward model, configs, and the
    previous evaluation it is compared with). Runs on the main process; others wait.
    """
    from accelerate import PartialState

    from alignloop.pipeline.runner import write_atomic

    state, out = PartialState(), eval_dir(run_dir, label)
    prev_metrics = _read(eval_dir(run_dir, previous) / "metrics.json") if previous else None
    key = _key(cfg, policy, reward, prev_metrics)
    existing = _read(out / "metrics.json")
    if existing and existing.get("key") == key:
        state.wait_for_everyone()
        return existing
    result = None
    if state.is_main_process:
        result = _evaluate(cfg, run_dir, label, policy, reward, previous, key)
        out.mkdir(parents=True, exist_ok=True)
        _write_answers(out / "answers.jsonl", result.pop("answers"))
        write_atomic(out / "metrics.json", json.dumps(result, indent=2, default=str))
        logger.info("eval %s: %s", label, ", ".join(f"{k} {v:.3f}" for k, v in result["summary"].items()
                                                      if isinstance(v, (int, float))))
    state.wait_for_everyone()
    return result if result is not None else _read(out / "metrics.json")


def _key(cfg: Recipe, policy, reward, prev_metrics) -> str:
    from alignloop.models.gguf import model_identity

    parts = [cfg.evaluation.model_dump(mode="json"),
             cfg.safety.model_dump(mode="json") if cfg.safety else None,
             cfg.generation.model_dump(mode="json"), model_identity(cfg.model), cfg.seed,
             policy and policy["key"], reward and reward["key"], prev_metrics and prev_metrics["key"]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _evaluate(cfg: Recipe, run_dir: Path, label: str, policy, reward, previous, key) -> dict:
    from alignloop.data.sources import load_sources
    from alignloop.generation.backends import open_generator
    from alignloop.generation.hf import SamplingSettings
    from alignloop.models.loading import resolve_path
    from alignloop.safety.mixing import read_safety

    ev = cfg.evaluation
    task = load_sources(ev.data, "prompt", cfg.bad_records, cfg.seed).records if ev.task else []
    safety = (read_safety(cfg.safety.eval_data, "prompt", cfg.bad_records, cfg.seed)[0]
              if ev.safety else [])
    records = [("task", r) for r in task] + [("safety", r) for r in safety]
    path = policy["path"] if policy else resolve_path(cfg.model)
    settings = SamplingSettings(n=1, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                                seed=cfg.seed)
    with open_generator(cfg.generation, path) as gen:
        samples = gen.generate([r["prompt"] for _, r in records], settings)
    answers = [{"prompt_id": r["prompt_id"], "kind": kind, "prompt": r["prompt"],
                "completion": s[0].text, "finish_reason": s[0].finish_reason}
               for (kind, r), s in zip(records, samples)]
    result: dict = {"key": key, "label": label, "policy": path, "summary": {}}
    if task:
        result["task"] = _task(ev.task, task, answers[:len(task)])
        result["summary"]["accuracy"] = result["task"]["accuracy"]
    if safety:
        result["safety"] = _safety(cfg, safety, [a["completion"] for a in answers[len(task):]])
        result["summary"]["vr"], result["summary"]["frr"] = result["safety"]["vr"], result["safety"]["frr"]
    if reward and ev.reward:
        result["reward"] = _reward(reward["path"], records, answers, run_dir, previous)
        result["summary"].update({k: result["reward"][k] for k in ("reward_mean", "win_rate")
                                  if result["reward"].get(k) is not None})
    result["answers"] = answers
    return result


def _task(name: str, records: list[dict], answers: list[dict]) -> dict:
    from alignloop.evaluation.metrics import load
    from alignloop.reward.verifiers import resolve_verifier

    verify = resolve_verifier(name)
    checks = [verify(r, a["completion"]) for r, a in zip(records, answers)]
    for answer, value in zip(answers, checks):  # None: the verifier does not apply (no answer)
        answer["correct"] = None if value is None else bool(value >= 0.5)
    correct = [int(a["correct"]) for a in answers if a["correct"] is not None]
    scores = load("task_accuracy").compute(predictions=correct)
    examples = [{"prompt": r["prompt"][-1]["content"], "answer": r.get("answer"),
                 "completion": a["completion"], "correct": a["correct"]}
                for r, a in zip(records[:10], answers[:10])]
    return {"task": name, **scores, "examples": examples}


def _safety(cfg: Recipe, records: list[dict], responses: list[str]) -> dict:
    from alignloop.safety.classifier import build_classifier
    from alignloop.safety.metrics import safety_metrics

    return safety_metrics(records, responses, build_classifier(cfg))


def _reward(rm_path, records, answers, run_dir: Path, previous: str | None) -> dict:
    from alignloop.evaluation.metrics import load
    from alignloop.reward.scoring import RewardScorer

    scorer = RewardScorer(rm_path)
    rewards = scorer.score([r["prompt"] for _, r in records], [a["completion"] for a in answers])
    for answer, value in zip(answers, rewards):
        answer["reward"] = value
    out = {"reward_mean": sum(rewards) / len(rewards) if rewards else None, "win_rate": None}
    old = _previous_answers(run_dir, previous)
    pairs = [(value, old[(a["kind"], a["prompt_id"])]) for a, value in zip(answers, rewards)
             if (a["kind"], a["prompt_id"]) in old]
    if pairs:
        old_prompts = [p for p, _ in (v for _, v in pairs)]
        old_rewards = scorer.score(old_prompts, [text for _, text in (v for _, v in pairs)])
        scores = load("win_rate").compute(predictions=[new for new, _ in pairs], references=old_rewards)
        out.update(win_rate=scores["win_rate"], compared=scores["total"], against=previous)
    return out


def _previous_answers(run_dir: Path, previous: str | None) -> dict:
    """(kind, prompt_id) -> (prompt, completion) of the previous evaluation, if there is one."""
    if previous is None:
        return {}
    path = eval_dir(run_dir, previous) / "answers.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return {(r["kind"], r["prompt_id"]): (r["prompt"], r["completion"]) for r in rows}


def _write_answers(path: Path, answers: list[dict]) -> None:
    from alignloop.data.readers import write_jsonl

    write_jsonl(path, answers)
