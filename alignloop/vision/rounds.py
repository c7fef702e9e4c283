"""Evaluating a vision policy at a point of the run, in the layout of the text evaluations
(alignloop.evaluation.rounds), so that the pipeline's report reads both alike:

    <run>/base_eval/          the starting model (vision.evaluation.before)
    <run>/round_1/eval/       the policy after the vision stages
    <run>/round_1/eval_<stage>/  ... after an earlier stage (vision.evaluation.stage_ablation)

    metrics.json   {"key", "label", "policy", "summary": {"accuracy", "accuracy_<task>",
                   "text_only_unchanged"}, "by_task", "count", "seconds"}
    answers.jsonl  one row per held-out prompt: kind "task", prompt_id, task, answer, response,
                   correct (what the report's paired intervals read)
    text.json      greedy answers to vision.evaluation.text_prompts with their token ids and a
                   hash of the prompt's logits; `text_only_unchanged` says whether they equal the
                   starting model's (base_eval/text.json) token for token and bit for bit
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alignloop.config import Recipe
from alignloop.evaluation.rounds import eval_dir
from alignloop.manifest import content_hash, write_atomic

logger = logging.getLogger("alignloop.vision")


def evaluate_round(cfg: Recipe, run_dir: Path, label: str, policy: dict,
                   reward: dict | None = None, previous: str | None = None) -> dict:
    """Evaluates `policy` ({"path", "key"}: the model and the key of what made it; for "base" the
    starting model, alignloop.pipeline.plan.base_key) on vision.evaluation and writes
    eval_dir(label); skipped when metrics.json holds the same key. `reward` and `previous` are
    the text evaluation's (reward mean, win rate): vision evaluation does not score with the
    vision reward model yet."""
    from accelerate import PartialState

    state, out, section = PartialState(), eval_dir(run_dir, label), cfg.vision.evaluation
    path = policy["path"]
    key = content_hash({"model": policy["key"],
                        "evaluation": section.model_dump(mode="json", exclude={"before", "stage_ablation"})})
    done = out / "metrics.json"
    metrics = json.loads(done.read_text()) if done.is_file() else None
    if state.is_main_process and (metrics is None or metrics.get("key") != key):
        metrics = _evaluate(cfg, path, key, label, out)
    state.wait_for_everyone()
    metrics = json.loads(done.read_text())
    base = eval_dir(run_dir, "base") / "text.json"
    if label != "base" and base.is_file():
        fields = ("tokens", "logits_sha256")  # the same answers and bit-identical logits
        before, now = (json.loads(p.read_text()) for p in (base, out / "text.json"))
        unchanged = [[a[f] for f in fields] for a in before] == [[a[f] for f in fields] for a in now]
        if metrics["summary"].get("text_only_unchanged") != unchanged and state.is_main_process:
            metrics["summary"]["text_only_unchanged"] = unchanged
            write_atomic(done, json.dumps(metrics, indent=2))
        metrics["summary"]["text_only_unchanged"] = unchanged
    return metrics


def _evaluate(cfg: Recipe, path: str, key: str, label: str, out: Path) -> dict:
    from alignloop.data.readers import write_jsonl
    from alignloop.data.sources import load_sources
    from alignloop.vision.evaluate import evaluate
    from alignloop.vision.loading import image_processor_for, load_vision_model, load_vision_tokenizer

    section, started = cfg.vision.evaluation, time.time()
    tokenizer = load_vision_tokenizer(cfg, path)
    model = load_vision_model(cfg, path, tokenizer).eval()
    records = load_sources(section.data, "vision_prompt", cfg.bad_records, cfg.seed).records
    found, answers, text = evaluate(model, tokenizer, image_processor_for(cfg, model), records, section)
    summary = {"accuracy": found["accuracy"],
               **{f"accuracy_{task}": value for task, value in found["by_task"].items()}}
    metrics = {"key": key, "label": label, "policy": path, "summary": summary, **found,
               "seconds": round(time.time() - started, 1)}
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "answers.jsonl", [{"kind": "task", **row} for row in answers])
    write_atomic(out / "text.json", json.dumps(text, indent=2))
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2))
    logger.info("eval %s: accuracy %.3f", label, found["accuracy"])
    return metrics
