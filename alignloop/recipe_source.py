"""A recipe's text and the messages that point back into it: YAML read with the line of every
key, `--set key=value` overrides, and each problem written as `file:line: key: message`
(`--set key: message` for a key the command line set).

pydantic's errors become such lines here. A section's validator names the key within the
section by raising alignloop.options.SectionProblems: pydantic's `loc` stops at the section,
and the key is appended to it.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from alignloop.options import SectionProblems

OVERRIDE = -1  # the "line" of a key set on the command line


class RecipeError(ValueError):
    """A recipe that cannot run. `problems` holds one `where: key: message` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid recipe:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-5` as a float (YAML 1.1 wants `2.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Returns the data and a map from dotted key (`sft.data.0.path`) to its 1-based line."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError([f"{source}{line}: not valid YAML: {getattr(err, 'problem', err)}"]) from None
    lines: dict[str, int] = {}
    _walk(node, "", lines)
    return data, lines


def _walk(node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _walk(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}.{i}"
            lines[key] = item.start_mark.line + 1
            _walk(item, key, lines)


# ---------------------------------------------------------------------------------------------
# Overrides: --set sft.learning_rate=2e-5


def apply_overrides(data: dict, lines: dict[str, int], overrides) -> None:
    """Applies each `a.b.0.c=value` in place and marks the key as set on the command line
    (its parents keep their lines when the file has them)."""
    for assignment in overrides:
        apply_override(data, assignment)
        parts = assignment.partition("=")[0].strip().split(".")
        for i in range(1, len(parts) + 1):
            key = ".".join(parts[:i])
            lines[key] = OVERRIDE if i == len(parts) else lines.get(key, OVERRIDE)


def apply_override(data: dict, assignment: str) -> None:
    """Sets `a.b.0.c=value` in place; the value is parsed as YAML (`2e-5`, `true`, `[a, b]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError([f"--set {assignment}: expected KEY=VALUE, e.g. sft.learning_rate=2e-5"])
    value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    parts = key.strip().split(".")
    node: Any = data
    for part in parts[:-1]:
        child = _child(node, part)
        if child is None:
            child = {}
            _set_child(node, part, child, assignment)
        node = child
    _set_child(node, parts[-1], value, assignment)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return node.get(part) if isinstance(node, dict) else None


def _set_child(node: Any, part: str, value: Any, assignment: str) -> None:
    if isinstance(node, dict):
        node[part] = value
    elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
        node[int(part)] = value
    else:
        raise RecipeError([f"--set {assignment}: cannot set '{part}' inside a {type(node).__name__}"])


# ---------------------------------------------------------------------------------------------
# Messages


class Where:
    """Formats `file:line: key: message`, walking up to the nearest key whose line is known. A
    key under one of `sections` (the stage sections) that the file leaves out gets the line of
    `stages`, which asks for the stage."""

    def __init__(self, source: str, lines: dict[str, int], sections=()):
        self.source, self.lines, self.sections = source, lines, sections

    def __call__(self, key: str, message: str) -> str:
        probe = key
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = self.lines.get(probe)
        if line is None and key.partition(".")[0] in self.sections:
            line = self.lines.get("stages")
        if line == OVERRIDE:
            return f"--set {key}: {message}"
        return f"{self.source}{f':{line}' if line else ''}: {key}: {message}"


def stage_where(source: str, label: str):
    """`where` for a problem found once a stage runs (a LoRA target that matches no module of the
    checkpoint): `label: file:line: key: message`, the recipe file read again for its lines."""
    from pathlib import Path

    lines: dict[str, int] = {}
    if Path(source).is_file():
        try:
            lines = parse_yaml(Path(source).read_text(encoding="utf-8"), source)[1]
        except RecipeError:
            pass
    where = Where(source, lines)
    return lambda key, message: f"{label}: {where(key, message)}"


def schema_problems(err: ValidationError, root: type[BaseModel], where: Where) -> list[str]:
    """pydantic's errors for the recipe class `root` as `where` lines, one per problem."""
    problems = []
    for error in err.errors():
        raised = (error.get("ctx") or {}).get("error")
        if isinstance(raised, SectionProblems):  # a section's validator: its keys extend the loc
            section = _dotted(error["loc"])
            problems += [where(f"{section}.{key}" if section else key, message)
                         for key, message in raised.problems]
        else:
            problems.append(where(_dotted(error["loc"]) or "(top level)", _message(error, root)))
    return problems


def _dotted(loc: tuple) -> str:
    # pydantic adds the class name of a union member / a function-validator tag to the loc
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and (p[:1].isupper() or "[" in p)))


def _message(error: dict, root: type[BaseModel]) -> str:
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        hint = difflib.get_close_matches(key, _fields_at(root, error["loc"][:-1]), n=1)
        if not hint and len(error["loc"]) == 1 and _is_trainer_option(key):
            return (f"unknown key (did you mean 'sft.{key}'? trainer options go in the stage's "
                    "section: sft, reward or dpo)")
        return "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    if error["type"] == "missing":
        return "required key is missing"
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return error["msg"].removeprefix("Value error, ") + shown


def _is_trainer_option(key: str) -> bool:
    from alignloop.training import argument_fields

    return key in argument_fields("sft")


def _fields_at(root: type[BaseModel], loc: tuple) -> list[str]:
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = _model_in(field.annotation)
    return list(getattr(cls, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        inner = _model_in(arg)
        if inner is not None:
            return inner
    return None
