"""alignloop's import graph, read from the source (every import, at module level or inside a
function): no cycles, and the lower layers never import the higher ones (issue 13)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "alignloop"
# Below alignloop/vision: the data contracts, models, generation and the pipeline's own code.
BELOW_VISION = ("alignloop.data", "alignloop.models", "alignloop.generation", "alignloop.pipeline")


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the alignloop modules it imports. `from package import name` counts as an
    import of the submodule when `name` is one, else of the package."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base)
        graph[name] = {t for t in (_owner(t, mods) for t in targets) if t and t != name}
    return graph


def _owner(target: str, mods) -> str | None:
    while target and target not in mods:
        target = target.rpartition(".")[0]
    return target or None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_right():
    """The reader sees lazy imports inside functions and relative imports (the tests below would
    pass on an empty graph)."""
    graph = import_graph()
    assert "alignloop.config" in graph["alignloop"]  # a lazy import inside __getattr__
    assert "alignloop.manifest" in graph["alignloop.pipeline.runner"]
    assert "alignloop.data.vision_records" in graph["alignloop.data.readers"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_lower_layers_never_import_vision():
    graph = import_graph()
    upward = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith(BELOW_VISION)
                    for t in targets if t.startswith("alignloop.vision"))
    assert upward == []


def test_manifest_module_is_the_bottom_layer():
    assert import_graph()["alignloop.manifest"] <= {"alignloop._version"}


def test_no_stage_imports_another_stages_module():
    """What the stages share lives below them (alignloop.training, models, data), not in one
    stage's module that the others import (dpo, reward and vision used to import sft.stage)."""
    graph = import_graph()
    stages = {m for m in graph if m.endswith(".stage")} | {"alignloop.vision.rejection_sampling"}
    crossing = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                      if t in stages and m.split(".")[:2] != t.split(".")[:2]
                      and not m.startswith(("alignloop.pipeline", "alignloop.cli")))  # they run stages
    assert crossing == []


def test_the_trainer_arguments_module_does_not_import_the_recipe_loader():
    """alignloop.config imports alignloop.training to check and build a recipe's trainer
    arguments; training must not need the loader back (nor anything that imports it)."""
    graph, seen, todo = import_graph(), set(), ["alignloop.training"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo += sorted(graph.get(module, ()))
    assert "alignloop.config" not in seen


def test_no_module_over_450_lines_but_the_triton_attention_kernels():
    """Files a newcomer can read (issue 13): the Triton flash-attention kernels, one file of jit
    kernels, launcher and autograd function (docs/kernels.md), are the exception."""
    long = {str(path.relative_to(ROOT)): n for path in ROOT.rglob("*.py")
            if (n := len(path.read_text().splitlines())) > 450}
    assert set(long) <= {"kernels/flash_attention.py"}, long
