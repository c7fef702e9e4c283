"""A vision run: `vision.stages` in order, in a run directory that survives being killed.

    <output_dir>/recipe.yaml                        the resolved recipe
    <output_dir>/base_eval/metrics.json             the starting model (with vision.evaluation):
                 answers.jsonl, text.json           held-out answers, text-only answers
    <output_dir>/round_1/vision_<stage>/            a complete stage (alignloop.vision.stage;
                                                    rejection sampling: alignloop.vision.rejection_sampling)
    <output_dir>/round_1/eval/...                   the same for the final model, plus whether its
                                                    text-only answers equal the starting model's
    <output_dir>/summary.json                       accuracy before/after, text check, seconds
    <output_dir>/manifest.json                      per stage: key, status, timing, metrics

The stages follow the text pipeline's contract and bookkeeping (alignloop.pipeline.runner): a
stage runs into `.work/` and is renamed into place; its key hashes its section, the model
section, seed, precision, data and the key of the model it starts from, and a stage whose key
matches a complete record is skipped.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from alignloop._version import __version__
from alignloop.config import Recipe
from alignloop.pipeline.context import StageContext
from alignloop.manifest import content_hash, fingerprint, write_atomic
from alignloop.pipeline.runner import RunResult, StageResult, _prepare, execute_stage

logger = logging.getLogger("alignloop.vision")
ROUND = 1  # a vision recipe is one round of stages


def plan(cfg: Recipe, run_dir: Path) -> tuple[list[tuple[StageContext, str, str]], tuple[str, str]]:
    """(context, key, key of the start model) of each vision stage, in order, and (path, key)
    of the final model. The reward stage's model does not become the policy."""
    from alignloop.models.loading import resolve_path

    vision = cfg.vision
    base = resolve_path(cfg.model)
    policy, policy_key = base, _start_key(cfg)
    steps = []
    produced: dict[str, tuple[Path, str]] = {}  # stage -> (its directory, its key)
    for stage in vision.stages:
        name = f"vision_{stage}"
        ctx = StageContext(name=name, round=ROUND, policy=policy, base=base, seed=cfg.seed + ROUND,
                           work_dir=run_dir / ".work" / f"round_{ROUND}" / name,
                           log_dir=run_dir / "logs" / f"round_{ROUND}" / name)
        section = getattr(vision, stage)
        consumed = _wire(cfg, ctx, stage, produced)
        sources = section.prompts if stage == "rejection_sampling" else section.data
        key = content_hash({"stage": name, "section": section.model_dump(mode="json"),
                     "start": policy_key, "seed": cfg.seed, "precision": cfg.precision,
                     "bad_records": cfg.bad_records, "tile_size": vision.tile_size,
                     "data": [fingerprint(s.path) for s in sources if s.path is not None],
                     "inputs": consumed, "alignloop": __version__})
        steps.append((ctx, key, policy_key))
        produced[stage] = (run_dir / ctx.label, key)
        if stage not in ("reward", "rejection_sampling"):  # neither becomes the policy
            policy, policy_key = str(run_dir / ctx.label / "model"), key
    return steps, (policy, policy_key)


def _wire(cfg: Recipe, ctx: StageContext, stage: str, produced: dict[str, tuple[Path, str]]) -> dict:
    """Points `ctx` at what earlier stages wrote for it, as the text loop does: rejection
    sampling gets the reward stage's model (else vision.rejection_sampling.reward_model), a
    later sft the best samples ("rs_best"), a later dpo the pairs ("rs_pairs"). Returns the keys
    of what it consumes (for its own key)."""
    rs = cfg.vision.rejection_sampling
    if stage == "rejection_sampling" and rs.scoring.reward_model > 0:
        if "reward" in produced:
            ctx.reward_model = produced["reward"][0] / "model"
            return {"reward_model": produced["reward"][1]}
        if rs.reward_model is not None:
            ctx.reward_model = Path(rs.reward_model).expanduser()
            found = ctx.reward_model.is_dir()  # (validation says so when it is not)
            return {"reward_model": fingerprint(ctx.reward_model) if found else str(ctx.reward_model)}
    if "rejection_sampling" in produced:
        folder, key = produced["rejection_sampling"]
        if stage == "sft":
            ctx.inputs["rs_best"] = [folder / "best.jsonl"]
            return {"rs_best": key}
        if stage == "dpo" and rs.pairs:
            ctx.inputs["rs_pairs"] = [folder / "pairs.jsonl"]
            return {"rs_pairs": key}
    return {}


def _start_key(cfg: Recipe) -> str:
    from alignloop.models.gguf import model_identity

    vision = cfg.vision
    parts = {"model": model_identity(cfg.model), "start": vision.start,
             "adapter_config": vision.adapter_config.model_dump(mode="json")}
    if vision.architecture == "llama3v":  # where features are cached does not change the model
        parts["llama3v"] = vision.llama3v.model_dump(mode="json", exclude={"cache_features", "cache_dir"})
    return content_hash(parts)


def run(cfg: Recipe) -> RunResult:
    """Evaluates the starting model (with vision.evaluation), runs the stages, evaluates the
    final model; prints and writes summary.json."""
    started = time.time()
    run_dir = _prepare(cfg)
    steps, (final, final_key) = plan(cfg, run_dir)
    result = RunResult(output_dir=run_dir)
    evaluation = cfg.vision.evaluation
    if evaluation is not None:
        result.evaluation["before"] = _evaluate(cfg, run_dir / "base_eval", _base(cfg),
                                                _start_key(cfg), None)
    for ctx, key, start_key in steps:
        result.stages[ctx.label] = _execute(cfg, run_dir, ctx, key, start_key)
    if evaluation is not None and final_key != _start_key(cfg):
        result.evaluation["after"] = _evaluate(cfg, run_dir / f"round_{ROUND}" / "eval", final,
                                               final_key, run_dir / "base_eval")
    summary = _summary(result, time.time() - started)
    write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    _print(run_dir, result, summary)
    return result


def run_stage(name: str, cfg: Recipe, round: int | None = None) -> StageResult:
    """Runs vision stage `name` (`vision_sft` or `sft`) after the stages before it that are not
    complete yet; nothing after it, no evaluation."""
    run_dir = _prepare(cfg)
    steps, _ = plan(cfg, run_dir)
    wanted = name if name.startswith("vision_") else f"vision_{name}"
    target = next((i for i, (ctx, _, _) in enumerate(steps) if ctx.name == wanted), None)
    if target is None or round not in (None, ROUND):
        raise ValueError(f"stage '{name}' is not in this recipe's stages "
                         f"({', '.join(ctx.name for ctx, _, _ in steps)}; a vision recipe has one round)")
    for ctx, key, start_key in steps[:target + 1]:
        last = _execute(cfg, run_dir, ctx, key, start_key)
    return last


def _base(cfg: Recipe) -> str:
    from alignloop.models.loading import resolve_path

    return resolve_path(cfg.model)


def _execute(cfg: Recipe, run_dir: Path, ctx: StageContext, key: str, start_key: str) -> StageResult:
    from alignloop.vision import rejection_sampling
    from alignloop.vision.stage import run as run_training

    run_stage = rejection_sampling.run if ctx.name == "vision_rejection_sampling" else run_training
    section = getattr(cfg.vision, ctx.name.removeprefix("vision_"))
    return execute_stage(run_dir, ctx, key, lambda staging: run_stage(cfg, ctx, staging),
                         {"consumes": {"policy": start_key, **_consumed(ctx)}},
                         keep_checkpoints=bool(getattr(section, "keep_checkpoints", False)))


def _consumed(ctx: StageContext) -> dict:
    """What besides the policy a stage read: the reward model, rejection sampling's files."""
    out = {name: [str(p) for p in paths] for name, paths in ctx.inputs.items()}
    if ctx.reward_model is not None:
        out["reward_model"] = str(ctx.reward_model)
    return out


def _evaluate(cfg: Recipe, out: Path, model_path: str, key: str, before: Path | None) -> dict:
    """Held-out accuracy and text-only answers of the model at `model_path`, written to `out`
    (skipped when `out` holds the same key). With `before`, also whether the text-only answers
    are token-identical to those in `before`."""
    from alignloop.data.readers import write_jsonl
    from alignloop.data.sources import load_sources
    from alignloop.vision.evaluate import evaluate
    from alignloop.vision.stage import image_processor_for, load_vision_model, load_vision_tokenizer

    section = cfg.vision.evaluation
    eval_key = content_hash({"model": key, "evaluation": section.model_dump(mode="json")})
    done = out / "metrics.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == eval_key:
        metrics = json.loads(done.read_text())
    else:
        tokenizer = load_vision_tokenizer(cfg, model_path)
        model = load_vision_model(cfg, model_path, tokenizer).eval()
        records = load_sources(section.data, "vision_prompt", cfg.bad_records, cfg.seed).records
        metrics, answers, text = evaluate(model, tokenizer, image_processor_for(cfg, model), records,
                                          section)
        metrics = {"key": eval_key, "model": model_path, **metrics}
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "answers.jsonl", answers)
        (out / "text.json").write_text(json.dumps(text, indent=2))
        write_atomic(done, json.dumps(metrics, indent=2))
    if before is not None:
        earlier = json.loads((before / "text.json").read_text())
        now = json.loads((out / "text.json").read_text())
        fields = ("tokens", "logits_sha256")  # the same answers and bit-identical logits
        metrics["text_only_unchanged"] = [[a[f] for f in fields] for a in earlier] == \
            [[a[f] for f in fields] for a in now]
        write_atomic(done, json.dumps(metrics, indent=2))
    return metrics


def _summary(result: RunResult, seconds: float) -> dict:
    before, after = result.evaluation.get("before", {}), result.evaluation.get("after", {})
    return {"accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
            "by_task_before": before.get("by_task"), "by_task_after": after.get("by_task"),
            "text_only_unchanged": after.get("text_only_unchanged"),
            "stages": {label: {"skipped": s.skipped, "train_seconds": s.metrics.get("train_seconds"),
                               "steps": s.metrics.get("steps")} for label, s in result.stages.items()},
            "seconds": round(seconds, 1)}


def _print(run_dir: Path, result: RunResult, summary: dict) -> None:
    lines = [f"run directory: {run_dir}"]
    for label, stage in result.stages.items():
        losses = stage.metrics.get("losses") or []
        detail = f", loss {losses[0]} -> {losses[-1]}" if losses else ""
        lines.append(f"  {label}: {'already complete' if stage.skipped else 'done'}{detail}")
    if summary["accuracy_before"] is not None:
        lines.append(f"  held-out accuracy: {summary['accuracy_before']:.3f} before, "
                     f"{summary['accuracy_after']:.3f} after"
                     if summary["accuracy_after"] is not None else
                     f"  held-out accuracy: {summary['accuracy_before']:.3f}")
        for task, value in (summary["by_task_after"] or {}).items():
            lines.append(f"    {task}: {summary['by_task_before'][task]:.3f} -> {value:.3f}")
    if summary["text_only_unchanged"] is not None:
        lines.append("  text-only answers unchanged: " + ("yes" if summary["text_only_unchanged"] else "NO"))
    lines.append(f"  {summary['seconds']:.0f} s")
    print("\n".join(lines), flush=True)
