"""The run's report: a table of per-round metrics (report.md) and their plot (report.png).

Rewritten after every round from manifest.json and the evaluations, so that a run in progress
(or a killed one) always has an up-to-date report.
"""

from __future__ import annotations

import json
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
    "sft_loss": ("sft", "SFT last loss"),
    "dpo_loss": ("dpo", "DPO last loss"),
}
PLOTTED = ("accuracy", "vr", "frr", "reward_mean", "win_rate", "rm_accuracy")


def rows(run_dir: Path) -> list[dict]:
    """One row per evaluated point (base, round_0, round_1, ...) with whatever is known."""
    from alignloop.evaluation.rounds import eval_dir
    from alignloop.pipeline.runner import read_manifest

    stages = read_manifest(run_dir).get("stages", {})
    labels = (["base"] if eval_dir(run_dir, "base").is_dir() else []) + sorted(
        {label.split("/")[0] for label in stages} | {p.parent.name for p in run_dir.glob("round_*/eval")},
        key=lambda name: int(name.split("_")[1]))
    out = []
    for label in labels:
        row = {"label": label}
        ev = eval_dir(run_dir, label) / "metrics.json"
        if ev.is_file():
            row.update(json.loads(ev.read_text()).get("summary", {}))
        metrics = {name.split("/")[1]: rec.get("metrics", {}) for name, rec in stages.items()
                   if name.startswith(f"{label}/")}
        row["rm_accuracy"] = metrics.get("reward", {}).get("accuracy")
        row["rs_best_score"] = metrics.get("rejection_sampling", {}).get("mean_best_score")
        rs = metrics.get("rejection_sampling", {})
        row["rs_kept"] = rs.get("best_kept")
        row["rs_all_failed"] = rs.get("skipped", {}).get("all_failed")
        row["rs_pairs"] = rs.get("pairs")
        row["synthetic_kept"] = metrics.get("synth_data", {}).get("kept")
        row["sft_loss"] = metrics.get("sft", {}).get("last_loss")
        row["dpo_loss"] = metrics.get("dpo", {}).get("last_loss")
        out.append(row)
    return out


def write_report(cfg: Recipe, run_dir: Path) -> Path:
    """Writes report.md (and report.png when there is something to plot); returns report.md."""
    from alignloop.pipeline.runner import write_atomic

    table = rows(run_dir)
    shown = [c for c in COLUMNS if any(row.get(c) is not None for row in table)]
    lines = [f"# alignloop run: {run_dir}", "",
             f"Recipe: {cfg.source}; {cfg.rounds} round(s) of {', '.join(cfg.stages)}"
             + ("; round 0: initial SFT" if cfg.initial_sft else ""), ""]
    if shown:
        lines += ["| | " + " | ".join(COLUMNS[c][1] for c in shown) + " |",
                  "|---|" + "---|" * len(shown)]
        for row in table:
            lines.append(f"| {row['label']} | " + " | ".join(_fmt(row.get(c)) for c in shown) + " |")
        if _plot(table, run_dir / "report.png"):
            lines += ["", "![per-round metrics](report.png)"]
    else:
        lines.append("No metrics yet.")
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _plot(table: list[dict], path: Path) -> bool:
    series = {c: [(i, row[c]) for i, row in enumerate(table) if isinstance(row.get(c), (int, float))]
              for c in PLOTTED}
    series = {c: points for c, points in series.items() if points}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for column, points in series.items():
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=COLUMNS[column][1])
    ax.set_xticks(range(len(table)), [row["label"] for row in table])
    ax.set_xlabel("evaluated after")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return True
