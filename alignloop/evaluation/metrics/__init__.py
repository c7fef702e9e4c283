"""`evaluate` metric modules shipped with alignloop, loaded by path (no hub needed).

    load("task_accuracy").compute(predictions=[1, 0, 1])
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(name: str):
    """The metric module `metrics/<name>/<name>.py`, loaded with `evaluate.load` by path."""
    import evaluate

    path = HERE / name / f"{name}.py"
    if not path.is_file():
        known = sorted(p.name for p in HERE.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"no metric module {name!r} (shipped: {', '.join(known)})")
    return evaluate.load(str(path))
