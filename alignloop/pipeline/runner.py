"""A run: rounds of stages inside one run directory that survives being killed.

    <output_dir>/recipe.yaml              the resolved recipe (defaults filled in)
    <output_dir>/round_<k>/<stage>/       a complete stage's artifacts (docs/architecture.md)
    <output_dir>/round_<k>/eval/          metrics.json + answers.jsonl of the policy after round k
    <output_dir>/base_eval/               ... of the starting model (evaluation.before)
    <output_dir>/manifest.json            per stage: key, inputs, status, attempts, timing, metrics
    <output_dir>/report.md, report.png    per-round metrics, rewritten after every round
    <output_dir>/.work/round_<k>/<stage>/ checkpoints of a stage in progress (resume continues here)

`plan()` lays the whole run out before anything runs: every stage's context (policy, reward
model, input artifacts) and its key, a hash over its config, data and the keys of what it
consumes. A stage whose key matches a complete record is skipped; a changed config changes its
key and the keys downstream, so those stages run again (STYLE.md: manifest written last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from alignloop._version import __version__
from alignloop.config import Recipe, dump_recipe, load_recipe
from alignloop.manifest import (content_hash, fingerprint, read_manifest, record_model, update_manifest,
                                write_atomic)
from alignloop.pipeline.context import StageContext

logger = logging.getLogger("alignloop.pipeline")

TRAINED_POLICY = ("sft", "dpo")  # stages whose model becomes the policy


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
# Planning


@dataclass
class Step:
    """One stage of one round, laid out before the run: its context and key."""

    ctx: StageContext
    key: str
    consumes: dict[str, str]  # what it reads -> the key of the stage (or model) that produced it
    cfg: Recipe               # the recipe as this round sees it (Recipe.for_round)


def plan(cfg: Recipe, run_dir: Path) -> tuple[list[Step], dict[int, dict]]:
    """Every stage of the run in order, and per round the policy after it (path and key)."""
    from alignloop.models.gguf import model_identity
    from alignloop.models.loading import resolve_path

    base = resolve_path(cfg.model)
    base_key = content_hash({"model": model_identity(cfg.model)})
    policy, policy_key = base, base_key
    steps: list[Step] = []
    produced: dict[str, list[tuple[int, Path, str]]] = {"rs_best": [], "synthetic": [], "rs_pairs": []}
    rounds: dict[int, dict] = {}
    schedule = ([(0, ["sft"])] if cfg.initial_sft else []) + \
               [(k, list(cfg.stages)) for k in range(1, cfg.rounds + 1)]
    whole = cfg
    for rnd, stages in schedule:
        cfg = whole.for_round(rnd)
        reward_dir, reward_key = _external_reward_model(cfg)
        trained: list[tuple[str, str, str]] = []  # (stage, policy after it, its key)
        for position, name in enumerate(stages):
            start, start_key = (base, base_key) if name == "sft" and cfg.sft.start == "base" \
                else (policy, policy_key)
            inputs, consumes = _inputs(cfg, name, rnd, produced)
            consumes.update(policy=start_key)
            if name in ("rejection_sampling", "synth_data"):
                consumes["reward_model"] = reward_key
            ctx = StageContext(
                name=name, round=rnd, policy=start, base=base, seed=cfg.seed + rnd,
                work_dir=run_dir / ".work" / f"round_{rnd}" / name,
                log_dir=run_dir / "logs" / f"round_{rnd}" / name,
                reward_model=reward_dir if name != "reward" else None, inputs=inputs,
                merge=_later_stage_starts_from(name, stages[position + 1:], rnd, schedule))
            key = stage_key(cfg, ctx, consumes)
            steps.append(Step(ctx, key, consumes, cfg))
            out = run_dir / ctx.label
            if name == "reward":
                reward_dir, reward_key = out / "model", key
            elif name in TRAINED_POLICY:
                policy, policy_key = str(_model_dir(out)), key
                trained.append((name, policy, key))
            elif name == "rejection_sampling":
                produced["rs_best"].append((rnd, out / "best.jsonl", key))
                if cfg.rejection_sampling.pairs:
                    produced["rs_pairs"].append((rnd, out / "pairs.jsonl", key))
            elif name == "synth_data":
                produced["synthetic"].append((rnd, out / "data.jsonl", key))
        rounds[rnd] = {"policy": policy, "policy_key": policy_key, "reward_model": reward_dir,
                       "reward_key": reward_key, "stage_policies": trained[:-1]}
    return steps, rounds


def _model_dir(stage_dir: Path) -> Path:
    """Where a training stage's model will be: merged/ for LoRA stages that merge, else model/.
    Known only once the stage ran, so callers resolve it again through StageResult.model_dir."""
    return stage_dir / "model"


def _later_stage_starts_from(name: str, rest: list[str], rnd: int, schedule) -> bool:
    """A LoRA stage whose model a later stage loads must also write merged/."""
    if name not in TRAINED_POLICY:
        return False
    later_rounds = any(r > rnd for r, _ in schedule)
    return bool(rest) or later_rounds


def _external_reward_model(cfg: Recipe) -> tuple[Path | None, str | None]:
    path = cfg.rejection_sampling.reward_model
    if path is None:
        return None, None
    return Path(path), content_hash({"reward_model": path, "fingerprint": fingerprint(Path(path))})


def _inputs(cfg: Recipe, name: str, rnd: int, produced) -> tuple[dict[str, list[Path]], dict]:
    """The artifact files stage `name` of round `rnd` reads, and the keys of their producers."""
    def pick(kind: str, which: str, earlier_only: bool = False):
        rows = [(r, p, k) for r, p, k in produced[kind] if r < rnd or (r == rnd and not earlier_only)]
        if which == "newest" and rows:
            newest = max(r for r, _, _ in rows)
            rows = [row for row in rows if row[0] == newest]
        return rows

    chosen: dict[str, list] = {}
    if name == "sft":
        chosen["rs_best"] = pick("rs_best", cfg.sft.rejection_sampled)
        chosen["synthetic"] = pick("synthetic", cfg.sft.synthetic)
    elif name == "dpo":
        chosen["rs_pairs"] = [row for row in pick("rs_pairs", cfg.dpo.pairs)]
    elif name == "reward" and cfg.reward.round_pairs:
        chosen["rs_pairs"] = pick("rs_pairs", "all", earlier_only=True)
    inputs = {kind: [p for _, p, _ in rows] for kind, rows in chosen.items() if rows}
    consumes = {f"{kind}:{p.parent.parent.name}": k for kind, rows in chosen.items() for _, p, k in rows}
    return inputs, consumes


def stage_key(cfg: Recipe, ctx: StageContext, consumes: dict) -> str:
    """Hash of what determines a stage's output: its config, data, inputs and the code version."""
    from alignloop.models.gguf import model_identity

    section = getattr(cfg, ctx.name)
    sources = [s for s in _stage_sources(cfg, ctx.name) if s.path is not None]
    parts = {
        "stage": ctx.name,
        "round": ctx.round,
        "section": section.model_dump(mode="json"),
        "model": model_identity(cfg.model),  # with the sha256 of a .gguf model file
        "seed": cfg.seed,
        "precision": cfg.precision,
        "bad_records": cfg.bad_records,
        "data": [fingerprint(src.path) for src in sources],
        "consumes": consumes,
        "alignloop": __version__,
    }
    if ctx.name in ("sft", "dpo") and cfg.safety is not None:
        parts["safety"] = cfg.safety.model_dump(mode="json")
    if ctx.name in ("rejection_sampling", "synth_data"):
        parts["generation"] = cfg.generation.model_dump(mode="json")
    return content_hash(parts)


def _stage_sources(cfg: Recipe, name: str) -> list:
    section = getattr(cfg, name)
    lists = {"sft": ["data", "eval_data"], "reward": ["data", "eval_data"], "dpo": ["data"],
             "rejection_sampling": ["prompts"], "synth_data": ["documents", "prompts"]}[name]
    sources = [s for attr in lists for s in getattr(section, attr)]
    if name in ("sft", "dpo") and cfg.safety is not None:
        sources += cfg.safety.data
    return sources


# ---------------------------------------------------------------------------------------------
# Running


def run(recipe: Recipe | str | Path | dict, overrides=(), *, output_dir=None) -> RunResult:
    """Runs every round of the recipe (skipping completed stages) and the evaluations."""
    from alignloop.evaluation.rounds import evaluate_round
    from alignloop.pipeline.report import write_report

    cfg = _as_recipe(recipe, overrides, output_dir)
    run_dir = _prepare(cfg)
    steps, rounds = plan(cfg, run_dir)
    result = RunResult(output_dir=run_dir)
    if cfg.evaluation is not None and cfg.evaluation.before:
        result.evaluation["before"] = evaluate_round(cfg, run_dir, "base", None, None)
    current = None
    for step in steps:
        if current is not None and step.ctx.round != current:
            _finish_round(cfg, run_dir, current, result, rounds)
        current = step.ctx.round
        step.ctx.policy = _resolved(step.ctx.policy)
        result.stages[step.ctx.label] = _execute(cfg, run_dir, step)
    if current is not None:
        _finish_round(cfg, run_dir, current, result, rounds)
    write_report(cfg, run_dir)
    _print_summary(result)
    return result


def _finish_round(cfg: Recipe, run_dir: Path, rnd: int, result: RunResult, rounds: dict) -> None:
    from alignloop.evaluation.rounds import evaluate_round
    from alignloop.pipeline.report import write_report

    if cfg.evaluation is None:
        return
    if cfg.evaluation.rounds == "last" and rnd != max(rounds):
        write_report(cfg, run_dir)
        return
    info = rounds[rnd]
    evaluated = rnd - 1 in rounds and cfg.evaluation.rounds == "all"
    previous = f"round_{rnd - 1}" if evaluated else ("base" if cfg.evaluation.before else None)
    reward = {"path": info["reward_model"], "key": info["reward_key"]} if info["reward_model"] else None
    if cfg.evaluation.stage_ablation:
        for stage, policy, key in info["stage_policies"]:
            result.evaluation[f"round_{rnd}.{stage}"] = evaluate_round(
                cfg, run_dir, f"round_{rnd}.{stage}", {"path": _resolved(policy), "key": key},
                reward, previous=previous)
    result.evaluation[f"round_{rnd}"] = evaluate_round(
        cfg, run_dir, f"round_{rnd}", {"path": _resolved(info["policy"]), "key": info["policy_key"]},
        reward, previous=previous)
    result.evaluation["after"] = result.evaluation[f"round_{rnd}"]
    write_report(cfg, run_dir)


def _resolved(policy: str) -> str:
    """A planned model/ directory of a LoRA stage that merged resolves to its merged/ sibling."""
    path = Path(policy)
    if path.name == "model" and (path.parent / "merged").is_dir():
        return str(path.parent / "merged")
    return policy


def run_stage(name: str, recipe: Recipe | str | Path | dict, overrides=(), *,
              output_dir=None, round: int | None = None) -> StageResult:
    """Runs stage `name` of `round` (default: the first round that has it), after running the
    stages before it that are not complete yet; nothing after it."""
    cfg = _as_recipe(recipe, overrides, output_dir)
    if name not in cfg.all_stages:
        raise ValueError(f"stage '{name}' is not in this recipe's stages ({', '.join(cfg.all_stages)})")
    run_dir = _prepare(cfg)
    steps, _ = plan(cfg, run_dir)
    target = next((i for i, s in enumerate(steps)
                   if s.ctx.name == name and (round is None or s.ctx.round == round)), None)
    if target is None:
        raise ValueError(f"stage '{name}' does not run in round {round}")
    for step in steps[:target + 1]:
        step.ctx.policy = _resolved(step.ctx.policy)
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


def _stage_function(name: str):
    import importlib

    return importlib.import_module(f"alignloop.{name}.stage").run


def _execute(cfg: Recipe, run_dir: Path, step: Step) -> StageResult:
    section = getattr(cfg, step.ctx.name, None)
    return execute_stage(run_dir, step.ctx, step.key,
                         lambda staging: _stage_function(step.ctx.name)(step.cfg, step.ctx, staging),
                         {"inputs": {k: [str(p) for p in v] for k, v in step.ctx.inputs.items()},
                          "consumes": step.consumes},
                         keep_checkpoints=bool(getattr(section, "keep_checkpoints", False)))


def execute_stage(run_dir: Path, ctx: StageContext, key: str, run, record: dict, *,
                  keep_checkpoints: bool) -> StageResult:
    """Runs one stage (`run(staging_dir) -> metrics`) into `.work/.../out` and renames it into
    place, recording it in the manifest with `record`'s fields; or skips it when complete under
    the same key. Shared by the text pipeline and the vision runner."""
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
        parts = [f"{name} {value:.3f}" for name, value in ev.get("summary", {}).items()
                 if isinstance(value, (int, float))]
        lines.append(f"  eval {when}: " + ", ".join(parts))
    print("\n".join(lines), flush=True)


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
