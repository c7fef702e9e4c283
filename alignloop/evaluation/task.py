"""Held-out task accuracy: generate an answer per prompt and check it with the task's verifier."""

from __future__ import annotations

import logging

from alignloop.config import EvaluationConfig
from alignloop.generation import SamplingSettings, generate

logger = logging.getLogger("alignloop.evaluation")


def task_accuracy(model, tokenizer, ecfg: EvaluationConfig, prompts: list[dict], seed: int = 0) -> dict:
    """{"task", "accuracy", "correct", "total", "examples"}; `prompts` are prompt records with `answer`."""
    from alignloop.data.tasks import VERIFIERS

    check = VERIFIERS[ecfg.task]
    settings = SamplingSettings(n=1, max_new_tokens=ecfg.max_new_tokens,
                                temperature=ecfg.temperature, seed=seed)
    completions = generate(model, tokenizer, [p["prompt"] for p in prompts], settings,
                           batch_size=ecfg.batch_size)
    results = [check(samples[0], p.get("answer")) for p, samples in zip(prompts, completions)]
    correct = sum(results)
    examples = [{"prompt_id": p["prompt_id"], "prompt": p["prompt"][-1]["content"],
                 "answer": p.get("answer"), "completion": samples[0], "correct": ok}
                for p, samples, ok in zip(prompts[:10], completions[:10], results[:10])]
    return {"task": ecfg.task, "accuracy": correct / max(len(prompts), 1), "correct": correct,
            "total": len(prompts), "examples": examples}
