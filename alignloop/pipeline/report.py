"""The run's report: per-round metrics (report.md, report.json) and their plot (report.png).

Rewritten after every round from manifest.json and the evaluations, so that a run in progress
(or a killed one) always has an up-to-date report.

    report.md    the metrics table; the safety notes (a rate that is not meaningful) and judges (the
                 primary one, the learned judge's held-out accuracy, each judge's agreement with
                 the rules); the changes table: for accuracy, VR and FRR,
                 every round against round_0 and against the point before it (round_{k-1}, or
                 base for round_0), and with evaluation.stage_ablation against its in-round
                 points (round_k.sft: the SFT model before DPO, so "round_k vs round_k.sft" is
                 DPO's own contribution), with a paired bootstrap 95% interval over the prompts
                 both points answered (alignloop/evaluation/stats.py)
    report.json  the same numbers: {"run", "rows", "intervals", "changes", "notes", "judges"}
    report.png   the rates (with each point's 95% Wilson interval for accuracy, VR and FRR) and
                 the reward mean, on separate panels
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from alignloop.config import Recipe

# column -> (where it comes from, how it is shown)
COLUMNS = {
    "accuracy": ("eval", "held-out task accuracy"),
    "vr": ("eval", "violation rate (adversarial)"),
    "frr": ("eval", "false-refusal rate (borderline)"),
    "reward_mean": ("eval", "reward mean (round's RM)"),
    "win_rate": ("eval", "RM win rate vs previous"),
    "rm_accuracy": ("reward", "RM held-out pair accuracy"),
    "rs_best_score": ("rejection_sampling", "RS mean best score"),
    "rs_kept": ("rejection_sampling", "RS answers kept"),
    "rs_all_failed": ("rejection_sampling", "RS prompts all failed"),
    "rs_pairs": ("rejection_sampling", "RS pairs kept"),
    "synthetic_kept": ("synth_data", "synthetic examples kept"),
    "adapter_loss": ("adapter", "vision adapter last loss"),
    "sft_loss": ("sft", "SFT last loss"),
    "dpo_loss": ("dpo", "DPO last loss"),
    # MoE checkpoints: the stage's expert load, coefficient of variation over the experts of a
    # layer, averaged over layers (alignloop.models.moe_load; 0 = every expert equally loaded)
    "rm_load_cv": ("reward", "RM expert load CV"),
    "sft_load_cv": ("sft", "SFT expert load CV"),
    "dpo_load_cv": ("dpo", "DPO expert load CV"),
}
RATES = ("accuracy", "vr", "frr", "win_rate", "rm_accuracy")  # plotted on [0, 1]
CHANGED = ("accuracy", "vr", "frr")  # per-prompt outcomes in answers.jsonl: intervals
NAMES = {"accuracy": "accuracy", "vr": "VR", "frr": "FRR"}


def rows(run_dir: Path) -> list[dict]:
    """One row per evaluated point (base, round_0, round_1, ...) with whatever is known."""
    from alignloop.evaluation.rounds import eval_dir
    from alignloop.manifest import read_manifest

    stages = read_manifest(run_dir).get("stages", {})
    inside = {f"{p.parent.name}.{p.name[5:]}" for p in run_dir.glob("round_*/eval_*")}
    labels = (["base"] if eval_dir(run_dir, "base").is_dir() else []) + sorted(
        {label.split("/")[0] for label in stages} | {p.parent.name for p in run_dir.glob("round_*/eval")}
        | inside, key=_order)
    out = []
    for label in labels:
        row = {"label": label}
        ev = eval_dir(run_dir, label) / "metrics.json"
        if ev.is_file():
            row.update(json.loads(ev.read_text()).get("summary", {}))
        if label in inside:  # a stage's policy inside a round: the round's stages are on its row
            out.append(row)
            continue
        metrics = {name.split("/")[1].removeprefix("vision_"): rec.get("metrics", {})
                   for name, rec in stages.items() if name.startswith(f"{label}/")}
        row["rm_accuracy"] = metrics.get("reward", {}).get("accuracy")
        row["rs_best_score"] = metrics.get("rejection_sampling", {}).get("mean_best_score")
        rs = metrics.get("rejection_sampling", {})
        row["rs_kept"] = rs.get("best_kept")
        row["rs_all_failed"] = rs.get("skipped", {}).get("all_failed")
        row["rs_pairs"] = rs.get("pairs")
        row["synthetic_kept"] = metrics.get("synth_data", {}).get("kept")
        row["adapter_loss"] = metrics.get("adapter", {}).get("last_loss")
        row["sft_loss"] = metrics.get("sft", {}).get("last_loss")
        row["dpo_loss"] = metrics.get("dpo", {}).get("last_loss")
        for stage, column in (("reward", "rm_load_cv"), ("sft", "sft_load_cv"), ("dpo", "dpo_load_cv")):
            row[column] = metrics.get(stage, {}).get("load_cv")
        out.append(row)
    return out


def _order(label: str) -> tuple[int, int]:
    """round_1.sft before round_1, after round_0."""
    point, _, stage = label.partition(".")
    return int(point.split("_")[1]), 0 if stage else 1


def write_report(cfg: Recipe, run_dir: Path) -> Path:
    """Writes report.md, report.json (and report.png when there is something to plot); returns
    report.md."""
    from alignloop.manifest import write_atomic

    table = rows(run_dir)
    answers = {row["label"]: _answers(run_dir, row["label"]) for row in table}
    intervals = {row["label"]: point_intervals(answers[row["label"]], row.get("judge")) for row in table}
    changes = compute_changes(table, answers)
    safety = {row["label"]: _safety(run_dir, row["label"]) for row in table}
    notes = {label: [str(note) for note in point.get("notes", [])] for label, point in safety.items()}
    judges = {label: {k: point[k] for k in ("judge", "judge_accuracy", "agreement") if k in point}
              for label, point in safety.items() if point.get("judge")}
    shown = _columns(table)
    lines = [f"# alignloop run: {run_dir}", "", f"Recipe: {cfg.source}; " + (
        f"vision stages {', '.join(cfg.vision.stages)}" if cfg.vision is not None else
        f"{cfg.rounds} round(s) of {', '.join(cfg.stages)}"
        + ("; round 0: initial SFT" if cfg.initial_sft else "")), ""]
    if shown:
        lines += ["| | " + " | ".join(_header(c) for c in shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for row in table:
            lines.append(f"| {row['label']} | " + " | ".join(_fmt(row.get(c)) for c in shown) + " |")
        if any(notes.values()):
            lines += [""] + [f"- {label}: {note}" for label, point in notes.items() for note in point]
        if judges:
            lines += [""] + [f"- {label}: {_judge_line(point)}" for label, point in judges.items()]
        if _plot(table, intervals, run_dir / "report.png"):
            lines += ["", "![per-round metrics](report.png)",
                      "", "Error bars: 95% Wilson interval of each point's accuracy, VR and FRR."]
    else:
        lines.append("No metrics yet.")
    lines += _changes_table(changes) + _stage_readings(changes)
    write_atomic(run_dir / "report.json", json.dumps(
        {"run": str(run_dir), "rows": table, "intervals": intervals, "changes": changes,
         "notes": notes, "judges": judges}, indent=2, default=str))
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Per-prompt outcomes and intervals


def outcome(metric: str, answer: dict, judge: str | None):
    """0/1 outcome of one answers.jsonl row for `metric`, None where it does not apply.

    accuracy: task rows' `correct`; vr: adversarial safety rows' judges[judge].unsafe; frr:
    borderline safety rows' judges[judge].refusal. Rows written before per-judge verdicts (no
    `safety` or `judges` field) have no VR/FRR outcome.
    """
    if metric == "accuracy":
        return answer.get("correct") if answer.get("kind") == "task" else None
    wanted = {"vr": ("adversarial", "unsafe"), "frr": ("borderline", "refusal")}[metric]
    if answer.get("kind") != "safety" or answer.get("safety") != wanted[0]:
        return None
    verdict = (answer.get("judges") or {}).get(judge) if judge else None
    return verdict.get(wanted[1]) if verdict else None


def point_intervals(answers: list[dict] | None, judge: str | None) -> dict:
    """metric -> {"successes", "n", "low", "high"}: the 95% Wilson interval of one point's rate,
    for the metrics whose per-prompt outcomes its answers carry."""
    from alignloop.evaluation.stats import wilson_interval

    out = {}
    for metric in CHANGED:
        values = [int(v) for v in (outcome(metric, a, judge) for a in answers or []) if v is not None]
        if values:
            low, high = wilson_interval(sum(values), len(values))
            out[metric] = {"successes": sum(values), "n": len(values), "low": low, "high": high}
    return out


def compute_changes(table: list[dict], answers: dict[str, list[dict] | None]) -> list[dict]:
    """Every round against round_0 and against the round before it (or base), where both have
    answers; a round's in-round points (round_k.<stage>, evaluation.stage_ablation) against the
    round before, and the round against them: the later stages' own contribution.

    Returns [{"point", "against", "accuracy": PairedChange fields | None, "vr": ..., "frr": ...}].
    Both sides' VR/FRR are read with the later point's primary judge (summary["judge"]), so the
    two are judged alike.
    """
    from alignloop.evaluation.stats import pair_answers, paired_bootstrap

    labels = [row["label"] for row in table]
    out = []
    for i, row in enumerate(table):
        label = row["label"]
        if label == "base" or i == 0:
            continue
        point, _, stage = label.partition(".")
        rounds_before = [other for other in labels[:i] if "." not in other]
        against = [other for other in ("round_0", rounds_before[-1] if rounds_before else None)
                   if other in labels and other != label]
        if stage:
            against = against[-1:]  # only the point the round started from
        else:
            against += [other for other in labels[:i] if other.startswith(f"{point}.")]
        for other in dict.fromkeys(against):
            if answers.get(label) is None or answers.get(other) is None:
                continue
            pairs = pair_answers(answers[other], answers[label], (other, label))
            change = {"point": label, "against": other}
            for metric in CHANGED:
                result = paired_bootstrap([outcome(metric, a, row.get("judge")) for a, _ in pairs],
                                          [outcome(metric, b, row.get("judge")) for _, b in pairs])
                change[metric] = asdict(result) if result else None
            out.append(change)
    return out


def _answers(run_dir: Path, label: str) -> list[dict] | None:
    from alignloop.evaluation.rounds import eval_dir

    path = eval_dir(run_dir, label) / "answers.jsonl"
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _safety(run_dir: Path, label: str) -> dict:
    """metrics.json's "safety" section of one point ({} when there is none)."""
    from alignloop.evaluation.rounds import eval_dir

    path = eval_dir(run_dir, label) / "metrics.json"
    return (json.loads(path.read_text()).get("safety") if path.is_file() else None) or {}


def _judge_line(point: dict) -> str:
    """"safety judge learned (learned judge's held-out accuracy: refusal 0.994, unsafe 0.965;
    rules on the same examples: 0.820, 0.640); agreement with rules on these answers: learned
    refusal 0.910, unsafe 0.550"."""
    line = f"safety judge {point['judge']}"
    acc = point.get("judge_accuracy")
    if acc:
        line += (f" (learned judge's held-out accuracy: refusal {_fmt(acc.get('refusal'))}, "
                 f"unsafe {_fmt(acc.get('unsafe'))}")
        rules = acc.get("rules")
        line += f"; rules on the same examples: {_pair(rules)})" if rules else ")"
    agreement = point.get("agreement") or {}
    if agreement:
        line += "; agreement with rules on these answers: " + ", ".join(
            f"{name} refusal {_fmt(a.get('refusal'))}, unsafe {_fmt(a.get('unsafe'))}"
            for name, a in agreement.items())
    return line


def _pair(rates: dict) -> str:
    return f"{_fmt(rates.get('refusal'))}, {_fmt(rates.get('unsafe'))}"


# ---------------------------------------------------------------------------------------------
# Tables


def _columns(table: list[dict]) -> list[str]:
    """COLUMNS that have a value, with any other scalar summary field (vr_<judge>, frr_<judge>,
    judge, on_topic, helpful_rate, ...) after frr."""
    extra = [key for row in table for key, value in row.items()
             if key not in COLUMNS and key != "label" and isinstance(value, (str, int, float))]
    order = list(COLUMNS)
    at = order.index("frr") + 1
    order[at:at] = list(dict.fromkeys(extra))
    return [c for c in order if any(row.get(c) is not None for row in table)]


def _header(column: str) -> str:
    if column in COLUMNS:
        return COLUMNS[column][1]
    for prefix, name in (("vr_", "violation rate"), ("frr_", "false-refusal rate")):
        if column.startswith(prefix):
            return f"{name} ({column[len(prefix):]})"
    if column.startswith("accuracy_"):
        return f"accuracy ({column[len('accuracy_'):]})"
    return {"judge": "safety judge", "on_topic": "on-topic rate", "helpful_rate": "helpful rate",
            "text_only_unchanged": "text-only answers unchanged"}.get(column, column)


def _changes_table(changes: list[dict]) -> list[str]:
    if not changes:
        return []
    lines = ["", "## Changes, paired 95% bootstrap intervals over the same prompts", "",
             "| | " + " | ".join(NAMES[m] for m in CHANGED) + " |", "|---|" + "---|" * len(CHANGED)]
    for change in changes:
        lines.append(f"| {change['point']} vs {change['against']} | "
                     + " | ".join(_fmt_change(change[m]) for m in CHANGED) + " |")
    first = next((c[m] for c in changes for m in CHANGED if c[m]), None)
    if first:
        lines += ["", f"Difference later - earlier over the n prompts both points answered; interval: "
                      f"2.5% and 97.5% quantiles of {first['resamples']:,} paired bootstrap resamples "
                      f"of the prompts (seed {first['seed']}); gained: 0 -> 1 (for VR a new "
                      f"violation, for FRR a new refusal), lost: 1 -> 0."]
    return lines


def _stage_readings(changes: list[dict]) -> list[str]:
    """One sentence per in-round comparison (round_k vs round_k.<stage>, evaluation.stage_ablation):
    what the stages after <stage> added, and whether any of it is distinguishable from zero."""
    lines = []
    for change in (c for c in changes if c["against"].startswith(f"{c['point']}.")):
        stage = change["against"].partition(".")[2]
        measured = {m: change[m] for m in CHANGED if change[m]}
        if not measured:
            continue
        moved = [f"{NAMES[m]} {c['difference']:+.3f}" for m, c in measured.items()
                 if c["low"] > 0 or c["high"] < 0]
        verdict = (f"{', '.join(moved)} (95% interval excludes 0)" if moved else
                   "no change distinguishable from 0 at 95% (" +
                   ", ".join(f"{NAMES[m]} [{c['low']:+.3f}, {c['high']:+.3f}]" for m, c in measured.items())
                   + ")")
        lines.append(f"- {change['point']}: what the stages after {stage} added on their own: {verdict}.")
    return (["", "What each round's last stages add on their own (evaluation.stage_ablation):", ""] + lines
            if lines else [])


def _fmt_change(change: dict | None) -> str:
    if change is None:
        return "-"
    return (f"{change['difference']:+.3f} [{change['low']:+.3f}, {change['high']:+.3f}] "
            f"({change['gained']} gained, {change['lost']} lost of {change['n']})")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


# ---------------------------------------------------------------------------------------------
# Plot


def _plot(table: list[dict], intervals: dict, path: Path) -> bool:
    """Rates on [0, 1] on the left (accuracy, VR and FRR with their Wilson intervals as error
    bars), the reward mean (unbounded) on its own panel on the right."""
    series = {c: [(i, row[c]) for i, row in enumerate(table) if _number(row.get(c))]
              for c in (*RATES, "reward_mean")}
    series = {c: points for c, points in series.items() if points}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in RATES if c in series], ["reward_mean"] if "reward_mean" in series else []
    panels = [p for p in panels if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(7 + 3 * (len(panels) - 1), 4), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 1][:len(panels)]})
    for ax, columns in zip(axes[0], panels):
        for j, column in enumerate(columns):
            dodge = (j - (len(columns) - 1) / 2) * 0.04  # error bars at one point side by side
            xs, ys = [i + dodge for i, _ in series[column]], [v for _, v in series[column]]
            below, above = _error_bars(table, intervals, column, series[column])
            ax.errorbar(xs, ys, yerr=[below, above] if any(below + above) else None, marker="o",
                        capsize=3, label=COLUMNS[column][1])
        ax.set_xticks(range(len(table)), [row["label"] for row in table])
        ax.set_xlabel("evaluated after")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if columns[0] in RATES:
            ax.set_ylim(-0.02, 1.02)
            ax.set_title("rates (bars: 95% Wilson interval)", fontsize=9)
        else:
            ax.set_title("reward mean", fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True


def _error_bars(table, intervals, column, points) -> tuple[list[float], list[float]]:
    """Distances below and above each plotted value to its interval (0 where there is none)."""
    below, above = [], []
    for i, value in points:
        interval = intervals.get(table[i]["label"], {}).get(column)
        below.append(max(0.0, value - interval["low"]) if interval else 0.0)
        above.append(max(0.0, interval["high"] - value) if interval else 0.0)
    return below, above


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
