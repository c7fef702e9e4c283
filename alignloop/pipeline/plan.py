"""The run laid out before anything runs: every stage of every round, its context and its key.

A text recipe runs `rounds` rounds of `stages` (round 0: `prune` and `distill` when listed, then
`initial_sft`); a vision recipe runs
`vision.stages` as round 1, each as `vision_<stage>` (docs/architecture.md). Both go through the
same wiring: a stage's role says what it hands on (a policy, a reward model, samples, pairs,
synthetic data) and what it reads from the stages before it. A stage's key hashes its recipe
section, the starting model, seed, precision, its data files' contents, the alignloop version and
the keys of everything it consumes, so a changed config reruns that stage and every stage after it.

The pipeline imports no stage package: `STAGE_FUNCTIONS` names each stage's entry function
`run(cfg, ctx, out_dir) -> metrics`, imported when the stage runs (tests/test_layering.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alignloop._version import __version__
from alignloop.config import PREPARATION, Recipe
from alignloop.manifest import content_hash, fingerprint
from alignloop.pipeline.context import StageContext

STAGE_FUNCTIONS = {
    "prune": "alignloop.prune.stage:run",
    "distill": "alignloop.distill.stage:run",
    "reward": "alignloop.reward.stage:run",
    "rejection_sampling": "alignloop.rejection_sampling.stage:run",
    "synth_data": "alignloop.synth_data.stage:run",
    "sft": "alignloop.sft.stage:run",
    "dpo": "alignloop.dpo.stage:run",
    "vision_adapter": "alignloop.vision.stage:adapter",
    "vision_sft": "alignloop.vision.stage:sft",
    "vision_reward": "alignloop.vision.stage:reward",
    "vision_rejection_sampling": "alignloop.vision.rejection_sampling:run",
    "vision_dpo": "alignloop.vision.stage:dpo",
}
# The evaluation after each round (and of the starting model): `evaluate_round(cfg, run_dir,
# label, policy, reward, previous) -> metrics`, for text recipes and for vision recipes.
EVALUATORS = {"text": "alignloop.evaluation.rounds:evaluate_round",
              "vision": "alignloop.vision.rounds:evaluate_round"}
POLICY_ROLES = ("prune", "distill", "adapter", "sft", "dpo")  # stages whose model becomes the policy


@dataclass
class Step:
    """One stage of one round, laid out before the run: its context and key."""

    ctx: StageContext
    key: str
    consumes: dict[str, str]  # what it reads -> the key of the stage (or model) that produced it
    cfg: Recipe               # the recipe as this round sees it (Recipe.for_round)


def role(name: str) -> str:
    """What a stage does in the loop: `vision_sft` -> sft."""
    return name.removeprefix("vision_")


def section(cfg: Recipe, name: str):
    """The recipe section of stage `name` (`vision_sft` -> vision.sft)."""
    return getattr(cfg.vision, role(name)) if name.startswith("vision_") else getattr(cfg, name)


def schedule(cfg: Recipe) -> list[tuple[int, list[str]]]:
    """(round, its stages in order) for the whole run."""
    if cfg.vision is not None:
        return [(1, [f"vision_{stage}" for stage in cfg.vision.stages])]
    first = [s for s in cfg.stages if s in PREPARATION] + (["sft"] if cfg.initial_sft else [])
    rounds = [s for s in cfg.stages if s not in PREPARATION]
    return ([(0, first)] if first else []) + ([(k, rounds) for k in range(1, cfg.rounds + 1)] if rounds else [])


def evaluation(cfg: Recipe):
    """(the evaluation section, EVALUATORS' key) of the recipe; the section is None without one."""
    if cfg.vision is not None:
        return cfg.vision.evaluation, "vision"
    return cfg.evaluation, "text"


def base_key(cfg: Recipe) -> str:
    """What the starting model is: the checkpoint (with a .gguf file's sha256) and, for a vision
    recipe, the adapter that `start: new` builds on it (or Llama 3-V's encoder and projector;
    where features are cached is not part of the model)."""
    from alignloop.models.gguf import model_identity

    parts: dict = {"model": model_identity(cfg.model)}
    if cfg.vision is not None:
        parts["vision"] = cfg.vision.model_dump(
            mode="json", include={"start", "architecture", "adapter_config", "llama3v"},
            exclude={"llama3v": {"cache_features", "cache_dir"}})
    return content_hash(parts)


def plan(cfg: Recipe, run_dir: Path) -> tuple[list[Step], dict[int, dict]]:
    """Every stage of the run in order, and per round the policy after it ({"policy",
    "policy_key", "reward_model", "reward_key", "stage_policies"})."""
    from alignloop.models.loading import resolve_path

    base, base_id = resolve_path(cfg.model), base_key(cfg)
    policy, policy_key = base, base_id
    steps: list[Step] = []
    produced: dict[str, list[tuple[int, Path, str]]] = {"rs_best": [], "synthetic": [], "rs_pairs": []}
    rounds: dict[int, dict] = {}
    whole, layout = cfg, schedule(cfg)
    for rnd, stages in layout:
        cfg = whole.for_round(rnd)
        reward_dir, reward_key = _external_reward_model(cfg)
        trained: list[tuple[str, str, str]] = []  # (stage, policy after it, its key)
        for position, name in enumerate(stages):
            kind = role(name)
            start, start_id = (base, base_id) if name == "sft" and cfg.sft.start == "base" \
                else (policy, policy_key)
            inputs, consumes = _inputs(cfg, name, rnd, produced)
            consumes.update(policy=start_id)
            if kind in ("rejection_sampling", "synth_data"):
                consumes["reward_model"] = reward_key
            ctx = StageContext(
                name=name, round=rnd, policy=start, base=base, seed=cfg.seed + rnd,
                work_dir=run_dir / ".work" / f"round_{rnd}" / name,
                log_dir=run_dir / "logs" / f"round_{rnd}" / name,
                reward_model=reward_dir if kind != "reward" else None, inputs=inputs,
                merge=_later_stage_starts_from(name, stages[position + 1:], rnd, layout))
            key = stage_key(cfg, ctx, consumes)
            steps.append(Step(ctx, key, consumes, cfg))
            out = run_dir / ctx.label
            if kind == "reward":
                reward_dir, reward_key = out / "model", key
            elif kind in POLICY_ROLES:
                policy, policy_key = str(model_dir(cfg, ctx, out)), key
                trained.append((kind, policy, key))
            elif kind == "rejection_sampling":
                produced["rs_best"].append((rnd, out / "best.jsonl", key))
                if section(cfg, name).pairs:
                    produced["rs_pairs"].append((rnd, out / "pairs.jsonl", key))
            elif kind == "synth_data":
                produced["synthetic"].append((rnd, out / "data.jsonl", key))
        rounds[rnd] = {"policy": policy, "policy_key": policy_key, "reward_model": reward_dir,
                       "reward_key": reward_key, "stage_policies": trained[:-1]}
    return steps, rounds


def model_dir(cfg: Recipe, ctx: StageContext, stage_dir: Path) -> Path:
    """Where a training stage's model will be: merged/ for a LoRA stage that merges (`merge`, or
    because a later stage starts from it), else model/ (a full model, or the adapter). Vision
    stages merge LoRA into model/ themselves; prune writes a whole model."""
    part = section(cfg, ctx.name)
    merges = ctx.name in ("sft", "dpo", "distill") and part.method != "full" and (part.merge or ctx.merge)
    return stage_dir / ("merged" if merges else "model")


def _later_stage_starts_from(name: str, rest: list[str], rnd: int, layout) -> bool:
    """A LoRA stage whose model a later stage loads must also write merged/."""
    if name not in ("sft", "dpo"):
        return False
    later_rounds = any(r > rnd for r, _ in layout)
    return bool(rest) or later_rounds


def _external_reward_model(cfg: Recipe) -> tuple[Path | None, str | None]:
    """rejection_sampling.reward_model (vision.rejection_sampling.reward_model): a reward model
    for rounds without a reward stage."""
    rs = cfg.vision.rejection_sampling if cfg.vision is not None else cfg.rejection_sampling
    if rs.reward_model is None:
        return None, None
    path = Path(rs.reward_model).expanduser()
    found = fingerprint(path) if path.is_dir() else None  # validation says so when it is not
    return path, content_hash({"reward_model": rs.reward_model, "fingerprint": found})


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
        chosen["rs_pairs"] = pick("rs_pairs", cfg.dpo.pairs)
    elif name == "reward" and cfg.reward.round_pairs:
        chosen["rs_pairs"] = pick("rs_pairs", "all", earlier_only=True)
    elif name == "vision_sft":  # a vision recipe is one round: what its sampling kept before
        chosen["rs_best"] = pick("rs_best", "all")
    elif name == "vision_dpo":
        chosen["rs_pairs"] = pick("rs_pairs", "all")
    inputs = {kind: [p for _, p, _ in rows] for kind, rows in chosen.items() if rows}
    consumes = {f"{kind}:{p.parent.parent.name}": k for kind, rows in chosen.items() for _, p, k in rows}
    return inputs, consumes


def stage_key(cfg: Recipe, ctx: StageContext, consumes: dict) -> str:
    """Hash of what determines a stage's output: its config, data, inputs and the code version."""
    from alignloop.models.gguf import model_identity

    sources = [s for s in _stage_sources(cfg, ctx.name) if s.path is not None]
    parts = {
        "stage": ctx.name,
        "round": ctx.round,
        "section": section(cfg, ctx.name).model_dump(mode="json"),
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
    if role(ctx.name) in ("rejection_sampling", "synth_data"):
        parts["generation"] = cfg.generation.model_dump(mode="json")
    if cfg.vision is not None:  # how images are tiled
        parts["tile_size"] = cfg.vision.tile_size
    return content_hash(parts)


def _stage_sources(cfg: Recipe, name: str) -> list:
    """The data sources of a stage's section (and the safety data mixed into sft and dpo)."""
    lists = {"reward": ["data", "eval_data"], "rejection_sampling": ["prompts"],
             "synth_data": ["documents", "prompts"]}.get(role(name), ["data"])
    if name == "sft":
        lists = ["data", "eval_data"]
    part = section(cfg, name)
    sources = [s for attr in lists for s in getattr(part, attr)]
    if name in ("sft", "dpo") and cfg.safety is not None:
        sources += cfg.safety.data
    return sources
