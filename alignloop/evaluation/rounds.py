"""Evaluating the policy after a round (and the starting model): what the report plots.

    <run>/round_<k>/eval/metrics.json   {"key", "label", "summary": {...}, "task", "safety", "reward"}
    <run>/round_<k>/eval/answers.jsonl  one row per held-out prompt: the policy's greedy answer
    <run>/base_eval/...                 the same for the starting model
    <run>/round_<k>/eval_<stage>/...    the same for the policy after <stage> inside round k
                                        (evaluation.stage_ablation: e.g. SFT's model before DPO)

summary: `accuracy` (task verifier on evaluation.data), `vr` / `frr` (safety.eval_data through
the primary safety judge, named in `judge`; reference A8), `vr_<judge>` / `frr_<judge>` for every
judge that ran (rules and learned always, llama_guard when configured), `on_topic` and
`helpful_rate` (docs/safety.md), `reward_mean` (the round's reward model on every answer) and
`win_rate` (that reward model: this round's answers against the previous evaluation's answers to
the same prompts). Numbers go through the `evaluate` metric modules in metrics/. A safety row of
answers.jsonl also has "safety", "category", "judges" ({name: {"unsafe", "refusal"}}) and
"on_topic"; metrics.json's "safety" has every judge's numbers, the "notes" (a rate that is not
meaningful) and the learned judge's own held-out accuracy ("judge_accuracy"); "seconds" is the
evaluation's own time (generation and judging).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from alignloop.config import Recipe

logger = logging.getLogger("alignloop.evaluation")


def eval_dir(run_dir: Path, label: str) -> Path:
    """base -> base_eval/; round_<k> -> round_<k>/eval/; round_<k>.<stage> (the policy after a
    stage inside round k, evaluation.stage_ablation) -> round_<k>/eval_<stage>/."""
    if label == "base":
        return run_dir / "base_eval"
    point, _, stage = label.partition(".")
    return run_dir / point / (f"eval_{stage}" if stage else "eval")


def evaluate_round(cfg: Recipe, run_dir: Path, label: str, policy: dict | None,
                   reward: dict | None, previous: str | None = None) -> dict:
    """Evaluates `policy` ({"path", "key"}; None: the recipe's model) and writes eval_dir(label).

    Skipped when metrics.json exists under the same key (policy, reward model, configs, and the
    previous evaluation it is compared with). Runs on the main process; others wait.
    """
    from accelerate import PartialState

    from alignloop.manifest import write_atomic

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

    parts = [cfg.evaluation.model_dump(mode="json", exclude={"rounds", "stage_ablation"}),  # which points: not how
             cfg.safety.model_dump(mode="json") if cfg.safety else None, _judge_key(cfg),
             cfg.generation.model_dump(mode="json"), model_identity(cfg.model), cfg.seed,
             policy and policy["key"], reward and reward["key"], prev_metrics and prev_metrics["key"]]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def _judge_key(cfg: Recipe) -> str | None:
    """The learned safety judge's cache key, when the evaluation runs it: a new judge, new numbers."""
    if not cfg.evaluation.safety:
        return None
    from alignloop.safety.judge import judge_key

    return judge_key()


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
    started = time.time()
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
        result["safety"] = _safety(cfg, safety, answers[len(task):])
        result["summary"].update(_safety_summary(result["safety"]))
    if reward and ev.reward:
        result["reward"] = _reward(reward["path"], records, answers, run_dir, previous)
        result["summary"].update({k: result["reward"][k] for k in ("reward_mean", "win_rate")
                                  if result["reward"].get(k) is not None})
    result["seconds"] = round(time.time() - started, 1)
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
    # Held-out sets that word some prompts in phrasings no training record uses (the built-in
    # arithmetic task's metadata.phrasing): accuracy on each, so a template learnt by heart shows.
    groups: dict[str, list[int]] = {}
    for record, answer in zip(records, answers):
        phrasing = (record.get("metadata") or {}).get("phrasing")
        if phrasing is not None:
            answer["phrasing"] = phrasing
            if answer["correct"] is not None:
                groups.setdefault(phrasing, []).append(int(answer["correct"]))
    if groups:
        scores["by_phrasing"] = {name: {"accuracy": sum(v) / len(v), "n": len(v)}
                                 for name, v in sorted(groups.items())}
    examples = [{"prompt": r["prompt"][-1]["content"], "answer": r.get("answer"),
                 "completion": a["completion"], "correct": a["correct"]}
                for r, a in zip(records[:10], answers[:10])]
    return {"task": name, **scores, "examples": examples}


def _safety(cfg: Recipe, records: list[dict], answers: list[dict]) -> dict:
    """Every safety judge on the answers (alignloop.safety.metrics.safety_evaluation); each answer
    row gains "safety", "category", "judges" ({name: {"unsafe", "refusal"}}) and "on_topic"."""
    from alignloop.safety.judges import build_judges
    from alignloop.safety.metrics import safety_evaluation

    judges, primary = build_judges(cfg)
    metrics, rows = safety_evaluation(records, [a["completion"] for a in answers], judges, primary)
    for answer, row in zip(answers, rows):
        answer.update(row)
    return metrics


def _safety_summary(safety: dict) -> dict:
    """vr / frr by the primary judge, its name, vr_<judge> / frr_<judge> for every judge that ran,
    on_topic and helpful_rate (alignloop.safety.metrics)."""
    out = {"vr": safety["vr"], "frr": safety["frr"], "judge": safety["judge"]}
    for name, metrics in safety["judges"].items():
        out[f"vr_{name}"], out[f"frr_{name}"] = metrics["vr"], metrics["frr"]
    return {**out, "on_topic": safety["on_topic"], "helpful_rate": safety["helpful_rate"]}


def _reward(rm_path, records, answers, run_dir: Path, previous: str | None) -> dict:
    from alignloop.evaluation.metrics import load
    from alignloop.reward.scoring import RewardScorer

    scorer = RewardScorer(rm_path)
    rewards = scorer.score([r["prompt"] for _, r in records], [a["completion"] for a in answers])
    for answer, value in zip(answers, rewards):
        answer["reward"] = value
    out = {"reward_mean": sum(rewards) / len(rewards) if rewards else None, "win_rate": None}
    old = _previous_answers(run_dir, previous)
    pairs = [(value, a["completion"], *old[(a["kind"], a["prompt_id"])])
             for a, value in zip(answers, rewards) if (a["kind"], a["prompt_id"]) in old]
    if pairs:
        new_rewards, new_texts, old_prompts, old_texts = (list(column) for column in zip(*pairs))
        old_rewards = _ties_for_identical(new_rewards, scorer.score(old_prompts, old_texts),
                                          new_texts, old_texts)
        scores = load("win_rate").compute(predictions=new_rewards, references=old_rewards)
        out.update(win_rate=scores["win_rate"], compared=scores["total"], against=previous,
                   identical=sum(new == old for new, old in zip(new_texts, old_texts)))
    return out


def _ties_for_identical(new_rewards: list[float], old_rewards: list[float], new_texts: list[str],
                        old_texts: list[str]) -> list[float]:
    """old_rewards with the new reward put in where the two answers are the same text, so that
    the win_rate metric counts a tie (0.5). The reward model scores the same text slightly
    differently in different batches (padding, batch size), and that float noise would otherwise
    decide identical greedy answers as wins or losses."""
    return [new if new_text == old_text else old
            for new, old, new_text, old_text in zip(new_rewards, old_rewards, new_texts, old_texts)]


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
