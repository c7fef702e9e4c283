"""Verifiers: programmatic checks that score a response in [0, 1], beside the learned reward model.

A verifier is `verify(record, response) -> float | None`, where `record` is a normalised prompt
record (`prompt`, optional `answer` and `metadata`); None means the check does not apply to that
prompt (the arithmetic check on a safety prompt), so mixed prompt sets can be scored together. Recipes name them in `scoring.verifiers` (weights) and
in `evaluation.task`: a built-in name below, or `package.module:function` for a user's own.
Built-ins are listed as import paths so that this registry imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Callable

Verifier = Callable[[dict, str], float]

VERIFIERS: dict[str, str] = {
    "arithmetic": "alignloop.data.tasks.arithmetic:verify",  # exact final answer
    "safety": "alignloop.safety.classifier:verify",          # refuses adversarial, answers borderline
    "shapes": "alignloop.data.tasks.shapes:verify",              # exact one-word answer (vision demo)
}


def resolve_verifier(name: str) -> Verifier:
    """The verifier function for a built-in name or a `package.module:function` path.

    Raises ValueError naming what is wrong (unknown name, module or function).
    """
    target = VERIFIERS.get(name, name)
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise ValueError(f"unknown verifier {name!r} (known: {', '.join(sorted(VERIFIERS))}; "
                         "or package.module:function)")
    if not module_name or not attr:
        raise ValueError(f"verifier {name!r}: expected package.module:function")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # not found, or the module itself fails (a SyntaxError, ...)
        raise ValueError(f"verifier {name!r}: cannot import {module_name} "
                         f"({type(err).__name__}: {err})") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ValueError(f"verifier {name!r}: {module_name} has no function {attr!r}")
    return function
