"""A run: rounds of stages inside one run directory that survives being killed.

    <output_dir>/recipe.yaml              the resolved recipe (defaults filled in)
    <output_dir>/round_<k>/<stage>/       a complete stage's artifacts (docs/architecture.md)
    <output_dir>/round_<k>/eval/          metrics.json + answers.jsonl of the policy after round k
    <output_dir>/base_eval/               ... of the starting model (evaluation.before)
    <output_dir>/manifest.json            per stage: key, inputs, status, attempts, timing, metrics
    <output_dir>/report.md, report.png    per-round metrics, rewritten after every round
    <output_dir>/.work/round_<k>/<stage>/ checkpoints of a stage in progress (resume continues here)

A vision recipe runs the same way: its `vision.stages` are round 1 (`round_1/vision_<stage>/`),
evaluated by alignloop.vision.rounds into the same layout. `plan()` (alignloop.pipeline.plan)
lays the whole run out before anything runs: every stage's context (policy, reward model, input
artifacts) and its key, a hash over its config, data and the keys of what it consumes. A stage
whose key matches a complete record is skipped; a changed config changes its key and the keys
downstream, so those stages run again (STYLE.md: manifest written last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignloop.config import Recipe, dump_recipe, load_recipe
from alignloop.manifest import read_manifest, record_model, update_manifest, write_atomic
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.plan import (EVALUATORS, STAGE_FUNCTIONS, Step, base_key, evaluation, plan,
                                     schedule, section)

logger = logging.getLogger("alignloop.pipeline")


@dataclass
class StageResult:
    """A completed stage's directory and metrics, with loaders for notebooks."""

    name: str
    path: Path
    metrics: dict
    skipped: bool = False  # True when this run found it already complete
    round: int = 1

    @property
    def model_dir(self) -> Path:
        """The merged model when there is one, else the model or adapter directory."""
        merged = self.path / "merged"
        return merged if merged.is_dir() else self.path / "model"

    def load_model(self):
        """(model, tokenizer) ready for generation; a LoRA adapter comes on its base."""
        from alignloop.models.loading import load_for_inference

        return load_for_inference(self.model_dir)

    def dataset(self, name: str = "data.jsonl"):
        """A JSONL artifact of the stage (default: the records it trained on) as a `datasets.Dataset`."""
        from datasets import Dataset

        return Dataset.from_json(str(self.path / name))


@dataclass
class RunResult:
    output_dir: Path
    stages: dict[str, StageResult] = field(default_factory=dict)  # "round_1/sft" -> result
    # "before": the starting model; "round_<k>": after round k; "round_<k>.<stage>": after that
    # stage inside round k (evaluation.stage_ablation); "after": the final policy
    evaluation: dict = field(default_factory=dict)

    def __getitem__(self, stage: str) -> StageResult:
        """`result["round_1/sft"]`, or `result["sft"]` for the stage's latest round."""
        if stage in self.stages:
            return self.stages[stage]
        matches = [r for label, r in self.stages.items() if label.endswith(f"/{stage}")]
        if not matches:
            raise KeyError(f"no stage {stage!r} in this run ({', '.join(self.stages)})")
        return matches[-1]


# ---------------------------------------------------------------------------------------------
# Running


def run(recipe: Recipe | str | Path | dict, overrides=(), *, output_dir=None) -> RunResult:
    """Runs every round of the recipe (skipping completed stages) and the evaluations; a vision
    recipe's stages are round 1."""
    from alignloop.models.loading import resolve_path
    from alignloop.pipeline.report import write_report

    cfg = _as_recipe(recipe, overrides, output_dir)
    run_dir = _prepare(cfg)
    steps, rounds = plan(cfg, run_dir)
    result = RunResult(output_dir=run_dir)
    ev, _ = evaluation(cfg)
    if ev is not None and ev.before:
        start = {"path": resolve_path(cfg.model), "key": base_key(cfg)}
        result.evaluation["before"] = _evaluate(cfg, run_dir, "base", start, None, None)
    current = None
    for step in steps:
        if current is not None and step.ctx.round != current:
            _finish_round(cfg, run_dir, current, result, rounds)
        current = step.ctx.round
        result.stages[step.ctx.label] = _execute(cfg, run_dir, step)
    if current is not None:
        _finish_round(cfg, run_dir, current, result, rounds)
    write_report(cfg, run_dir)
    _print_summary(result)
    return result


def _evaluate(cfg: Recipe, run_dir: Path, label: str, policy: dict, reward: dict | None,
              previous: str | None) -> dict:
    """The recipe's evaluation (text or vision: plan.EVALUATORS) of `policy` at `label`."""
    _, kind = evaluation(cfg)
    return _imported(EVALUATORS[kind])(cfg, run_dir, label, policy, reward, previous=previous)


def _finish_round(cfg: Recipe, run_dir: Path, rnd: int, result: RunResult, rounds: dict) -> None:
    from alignloop.pipeline.report import write_report

    ev, _ = evaluation(cfg)
    if ev is None:
        return
    if getattr(ev, "rounds", "all") == "last" and rnd != max(rounds):
        write_report(cfg, run_dir)
        return
    info = rounds[rnd]
    evaluated = rnd - 1 in rounds and getattr(ev, "rounds", "all") == "all"
    previous = f"round_{rnd - 1}" if evaluated else ("base" if ev.before else None)
    reward = {"path": info["reward_model"], "key": info["reward_key"]} if info["reward_model"] else None
    if ev.stage_ablation:
        for stage, policy, key in info["stage_policies"]:
            result.evaluation[f"round_{rnd}.{stage}"] = _evaluate(
                cfg, run_dir, f"round_{rnd}.{stage}", {"path": policy, "key": key}, reward, previous)
    result.evaluation[f"round_{rnd}"] = _evaluate(
        cfg, run_dir, f"round_{rnd}", {"path": info["policy"], "key": info["policy_key"]}, reward,
        previous)
    result.evaluation["after"] = result.evaluation[f"round_{rnd}"]
    write_report(cfg, run_dir)


def run_stage(name: str, recipe: Recipe | str | Path | dict, overrides=(), *,
              output_dir=None, round: int | None = None) -> StageResult:
    """Runs stage `name` of `round` (default: the first round that has it), after running the
    stages before it that are not complete yet; nothing after it. In a vision recipe `name` is
    `vision_<stage>` (or just `<stage>`)."""
    cfg = _as_recipe(recipe, overrides, output_dir)
    names = [n for _, stages in schedule(cfg) for n in stages]
    if name not in names and f"vision_{name}" in names:
        name = f"vision_{name}"
    if name not in names:
        raise ValueError(f"stage '{name}' is not in this recipe's stages ({', '.join(dict.fromkeys(names))})")
    run_dir = _prepare(cfg)
    steps, _ = plan(cfg, run_dir)
    target = next((i for i, s in enumerate(steps)
                   if s.ctx.name == name and (round is None or s.ctx.round == round)), None)
    if target is None:
        raise ValueError(f"stage '{name}' does not run in round {round}")
    for step in steps[:target + 1]:
        last = _execute(cfg, run_dir, step)
    return last


def _as_recipe(recipe, overrides, output_dir) -> Recipe:
    if isinstance(recipe, Recipe):
        if overrides or output_dir is not None:
            raise ValueError("overrides and output_dir apply when loading a recipe; pass the "
                             "recipe path or dict instead of a loaded Recipe")
        return recipe
    return load_recipe(recipe, overrides, output_dir=output_dir)


def _prepare(cfg: Recipe) -> Path:
    from accelerate import PartialState

    run_dir = Path(cfg.output_dir)
    if PartialState().is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "recipe.yaml", dump_recipe(cfg))
        record_model(run_dir, _model_record(cfg))
    PartialState().wait_for_everyone()
    return run_dir


def _imported(entry: str):
    """"package.module:function" -> the function (STAGE_FUNCTIONS, EVALUATORS)."""
    import importlib

    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def _execute(cfg: Recipe, run_dir: Path, step: Step) -> StageResult:
    part = section(step.cfg, step.ctx.name)
    stage = _imported(STAGE_FUNCTIONS[step.ctx.name])
    record = {"inputs": {k: [str(p) for p in v] for k, v in step.ctx.inputs.items()},
              "consumes": step.consumes}
    if step.ctx.reward_model is not None:
        record["reward_model"] = str(step.ctx.reward_model)
    return execute_stage(run_dir, step.ctx, step.key, lambda staging: stage(step.cfg, step.ctx, staging),
                         record, keep_checkpoints=bool(getattr(part, "keep_checkpoints", False)))


def execute_stage(run_dir: Path, ctx: StageContext, key: str, run, record: dict, *,
                  keep_checkpoints: bool) -> StageResult:
    """Runs one stage (`run(staging_dir) -> metrics`) into `.work/.../out` and renames it into
    place, recording it in the manifest with `record`'s fields; or skips it when complete under
    the same key."""
    from accelerate import PartialState

    state = PartialState()
    final = run_dir / ctx.label
    done = read_manifest(run_dir).get("stages", {}).get(ctx.label, {})
    if done.get("key") == key and done.get("status") == "complete" and final.is_dir():
        logger.info("%s: complete in %s, skipped", ctx.label, final)
        return StageResult(ctx.name, final, done.get("metrics", {}), skipped=True, round=ctx.round)
    if state.is_main_process:
        _reset_work_dir(ctx.work_dir, key)
    state.wait_for_everyone()
    attempts = _start_attempt(ctx.work_dir, state.is_main_process)
    logger.info("%s: running (attempt %d)", ctx.label, len(attempts))
    started = time.time()
    staging = ctx.work_dir / "out"
    metrics = run(staging)
    if state.is_main_process:
        if final.exists():
            shutil.rmtree(final)  # an earlier result under another config
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, final)
        attempts[-1]["resumed_from"] = metrics.get("resumed_from")
        update_manifest(run_dir, ctx.label, {
            "status": "complete", "key": key, "stage": ctx.name, "round": ctx.round,
            "policy": ctx.policy, **record, "attempts": attempts, "started": started,
            "seconds": round(time.time() - started, 1), "metrics": _summary(metrics)})
        if not keep_checkpoints:
            shutil.rmtree(ctx.work_dir, ignore_errors=True)
    state.wait_for_everyone()
    return StageResult(ctx.name, final, metrics, round=ctx.round)


def _start_attempt(work_dir: Path, main: bool) -> list[dict]:
    """Appends this attempt to `<work_dir>/attempts.json`: how often a stage started, and from what."""
    path = work_dir / "attempts.json"
    attempts = json.loads(path.read_text()) if path.is_file() else []
    attempts.append({"started": time.time(), "checkpoints": sorted(
        p.name for p in (work_dir / "checkpoints").glob("checkpoint-*"))})
    if main:
        write_atomic(path, json.dumps(attempts))
    return attempts


def _reset_work_dir(work: Path, key: str) -> None:
    """Keeps checkpoints only when they were written under the same stage key."""
    stamp = work / "key"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != key):
        logger.info("discarding %s: written under another config", work)
        shutil.rmtree(work)
    if (work / "out").exists():
        shutil.rmtree(work / "out")  # a half-written output from a killed attempt
    work.mkdir(parents=True, exist_ok=True)
    stamp.write_text(key)


def _summary(metrics: dict) -> dict:
    """The small metrics kept in the manifest (the stage's metrics.json has everything)."""
    out = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    losses = metrics.get("losses") or []
    if losses:
        out["first_loss"], out["last_loss"] = losses[0], losses[-1]
    return out


def _print_summary(result: RunResult) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    lines = [f"run directory: {result.output_dir}"]
    for label, stage in result.stages.items():
        m = stage.metrics
        detail = f"loss {m['first_loss']} -> {m['last_loss']}" if "first_loss" in m else \
            (f"loss {m['losses'][0]} -> {m['losses'][-1]}" if m.get("losses") else "")
        lines.append(f"  {label}: {'already complete' if stage.skipped else 'done'}"
                     + (f", {detail}" if detail else ""))
    for when, ev in result.evaluation.items():
        if when == "after":
            continue
        parts = [f"{name} {_shown(value)}" for name, value in ev.get("summary", {}).items()
                 if isinstance(value, (int, float))]
        lines.append(f"  eval {when}: " + ", ".join(parts))
    print("\n".join(lines), flush=True)


def _shown(value) -> str:
    return ("yes" if value else "NO") if isinstance(value, bool) else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# The manifest's model record (the rest: alignloop/manifest.py)


def _model_record(cfg: Recipe) -> dict:
    """The run's base model for the manifest; a .gguf file with its sha256 and the directory it
    is converted into (alignloop.models.gguf)."""
    from alignloop.models.gguf import converted_dir, file_sha256, is_gguf

    record = {"path": cfg.model.path}
    if is_gguf(cfg.model.path):
        record.update(gguf_sha256=file_sha256(cfg.model.path),
                      converted_dir=str(converted_dir(cfg.model.path)))
    if cfg.model.tokenizer and is_gguf(cfg.model.tokenizer):
        record.update(tokenizer=cfg.model.tokenizer,
                      tokenizer_gguf_sha256=file_sha256(cfg.model.tokenizer))
    return record
