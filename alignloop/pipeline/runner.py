"""A run: a recipe's stages in order, inside one run directory that survives being killed.

    <output_dir>/recipe.yaml        the resolved recipe (defaults filled in)
    <output_dir>/<stage>/           a stage's artifacts; the directory appears only when complete
    <output_dir>/eval/before.json   held-out task accuracy of the starting model
    <output_dir>/eval/after.json    ... and of the final model
    <output_dir>/manifest.json      per stage: key, status, timing, metrics; written last, atomically
    <output_dir>/.work/<stage>/     checkpoints of a stage in progress (what resume continues from)

A stage whose key (its config, the model it starts from, its data files' contents and the
alignloop version, hashed) matches a completed record is skipped; a changed config re-runs it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from alignloop import __version__
from alignloop.config import Recipe, dump_recipe, load_recipe

logger = logging.getLogger("alignloop.pipeline")

LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


@dataclass
class StageResult:
    """A completed stage's directory and metrics, with loaders for notebooks."""

    name: str
    path: Path
    metrics: dict
    skipped: bool = False  # True when this run found it already complete

    @property
    def model_dir(self) -> Path:
        """The merged model when there is one, else the model or adapter directory."""
        merged = self.path / "merged"
        return merged if merged.is_dir() else self.path / "model"

    def load_model(self):
        """(model, tokenizer) ready for generation; a LoRA adapter comes on its base."""
        from alignloop.models.loading import load_for_inference

        return load_for_inference(self.model_dir)

    def dataset(self):
        """The records the stage trained on, as a `datasets.Dataset`."""
        from datasets import Dataset

        return Dataset.from_json(str(self.path / "data.jsonl"))


@dataclass
class RunResult:
    output_dir: Path
    stages: dict[str, StageResult] = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)  # "before" / "after" task accuracy

    def __getitem__(self, stage: str) -> StageResult:
        return self.stages[stage]


def run(recipe: Recipe | str | Path | dict, overrides=(), *, output_dir=None) -> RunResult:
    """Runs every stage of the recipe (skipping completed ones) and the evaluation around them."""
    cfg = _as_recipe(recipe, overrides, output_dir)
    run_dir = _prepare(cfg)
    result = RunResult(output_dir=run_dir)
    if cfg.evaluation is not None and cfg.evaluation.before:
        result.evaluation["before"] = _evaluate(cfg, run_dir, "before", None)
    model_path = None
    for stage in cfg.stages:
        result.stages[stage] = _run_stage(cfg, run_dir, stage, model_path)
        model_path = str(result.stages[stage].model_dir)
    if cfg.evaluation is not None and result.stages:
        result.evaluation["after"] = _evaluate(cfg, run_dir, "after", result.stages[cfg.stages[-1]])
    _print_summary(result)
    return result


def run_stage(name: str, recipe: Recipe | str | Path | dict, overrides=(), *,
              output_dir=None) -> StageResult:
    """Runs one stage of the recipe, from the recipe's model."""
    cfg = _as_recipe(recipe, overrides, output_dir)
    if name not in cfg.stages:
        raise ValueError(f"stage '{name}' is not in this recipe's stages ({', '.join(cfg.stages)})")
    return _run_stage(cfg, _prepare(cfg), name, None)


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
    PartialState().wait_for_everyone()
    return run_dir


# ---------------------------------------------------------------------------------------------
# Stages


def _run_stage(cfg: Recipe, run_dir: Path, stage: str, model_path: str | None) -> StageResult:
    from accelerate import PartialState

    from alignloop.sft import stage as sft_stage

    state = PartialState()
    key = stage_key(cfg, stage, model_path)
    final, work = run_dir / stage, run_dir / ".work" / stage
    record = read_manifest(run_dir).get("stages", {}).get(stage, {})
    if record.get("key") == key and record.get("status") == "complete" and final.is_dir():
        logger.info("%s: complete in %s, skipped", stage, final)
        return StageResult(stage, final, record.get("metrics", {}), skipped=True)
    if state.is_main_process:
        _reset_work_dir(work, key)
    state.wait_for_everyone()
    started = time.time()
    staging = work / "out"
    metrics = {"sft": sft_stage.run}[stage](cfg, staging, work, base_model=model_path,
                                            log_dir=run_dir / "logs" / stage)
    if state.is_main_process:
        if final.exists():
            shutil.rmtree(final)  # an earlier result under another config
        os.replace(staging, final)
        update_manifest(run_dir, stage, {"status": "complete", "key": key, "started": started,
                                         "seconds": round(time.time() - started, 1),
                                         "metrics": _summary(metrics)})
        if not getattr(cfg, stage).keep_checkpoints:
            shutil.rmtree(work, ignore_errors=True)
    state.wait_for_everyone()
    return StageResult(stage, final, metrics)


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


def stage_key(cfg: Recipe, stage: str, model_path: str | None) -> str:
    """Hash of what determines a stage's output: its config, starting model, data and code."""
    section = getattr(cfg, stage)
    parts = {
        "stage": section.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "start": model_path,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "bad_records": cfg.bad_records,
        "data": [_fingerprint(src.path) for src in section.data + section.eval_data if src.path],
        "alignloop": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _summary(metrics: dict) -> dict:
    keep = ("method", "train_loss", "steps", "train_seconds", "resumed_from")
    out = {k: metrics[k] for k in keep if k in metrics}
    losses = metrics.get("losses") or []
    if losses:
        out["first_loss"], out["last_loss"] = losses[0], losses[-1]
    return out


# ---------------------------------------------------------------------------------------------
# Evaluation


def _evaluate(cfg: Recipe, run_dir: Path, when: str, stage: StageResult | None) -> dict:
    """Task accuracy of the starting model (`before`) or of `stage`'s model; on the main process."""
    from accelerate import PartialState

    state = PartialState()
    path = run_dir / "eval" / f"{when}.json"
    key = hashlib.sha256(json.dumps([cfg.evaluation.model_dump(mode="json"),
                                     cfg.model.model_dump(mode="json"), cfg.seed,
                                     stage and read_manifest(run_dir)["stages"][stage.name]["key"]],
                                    default=str).encode()).hexdigest()[:16]
    if path.is_file() and json.loads(path.read_text()).get("key") == key:
        state.wait_for_everyone()
        return json.loads(path.read_text())
    result = None
    if state.is_main_process:
        result = {"key": key, **_accuracy(cfg, stage)}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(result, indent=2))
        logger.info("held-out %s accuracy %s: %.1f%% (%d/%d)", cfg.evaluation.task, when,
                    100 * result["accuracy"], result["correct"], result["total"])
    state.wait_for_everyone()
    return result if result is not None else json.loads(path.read_text())


def _accuracy(cfg: Recipe, stage: StageResult | None) -> dict:
    from alignloop.data.sources import load_sources
    from alignloop.evaluation.task import task_accuracy
    from alignloop.models.loading import load_for_inference, load_model, load_tokenizer, resolve_path

    prompts = load_sources(cfg.evaluation.data, "prompt", cfg.bad_records, cfg.seed).records
    if stage is None:
        path = resolve_path(cfg.model)
        model, tokenizer = load_model(cfg, path), load_tokenizer(cfg.model, path)
    else:
        model, tokenizer = load_for_inference(stage.model_dir)
    model.eval()
    return task_accuracy(model, tokenizer, cfg.evaluation, prompts, seed=cfg.seed)


def _print_summary(result: RunResult) -> None:
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    lines = [f"run directory: {result.output_dir}"]
    for name, stage in result.stages.items():
        m = stage.metrics
        loss = f"loss {m.get('first_loss', (m.get('losses') or ['?'])[0])} -> " \
               f"{m.get('last_loss', (m.get('losses') or ['?'])[-1])}"
        lines.append(f"  {name}: {'already complete' if stage.skipped else 'done'}, {loss}, "
                     f"model in {stage.model_dir}")
    ev = result.evaluation
    if ev:
        task = next(iter(ev.values()))["task"]
        parts = [f"{when} {100 * ev[when]['accuracy']:.1f}% ({ev[when]['correct']}/{ev[when]['total']})"
                 for when in ("before", "after") if when in ev]
        lines.append(f"  held-out {task} accuracy: " + " -> ".join(parts))
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------------------------
# Manifest and atomic writes


def read_manifest(run_dir: Path) -> dict:
    path = Path(run_dir) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_manifest(run_dir: Path, stage: str, record: dict) -> None:
    manifest = read_manifest(run_dir)
    manifest.setdefault("alignloop", __version__)
    manifest["versions"] = {lib: _version(lib) for lib in LIBRARIES}
    manifest.setdefault("stages", {})[stage] = record
    write_atomic(Path(run_dir) / "manifest.json", json.dumps(manifest, indent=2, default=str))


def _version(lib: str) -> str | None:
    try:
        return metadata.version(lib)
    except metadata.PackageNotFoundError:
        return None


def write_atomic(path: Path, text: str) -> None:
    """Writes `text` to a temporary sibling and renames it over `path` (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
