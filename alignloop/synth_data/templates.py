"""Prompt templates for the generator: Python format strings with named fields.

A recipe picks a built-in by name (`document_template: qa_from_document`) or writes its own text
(`prompt_template: "{prompt}\n\nShow your work."`); a value that contains no `{` is a name.

| seed kind | fields                                   | the generator is asked to        | parser          |
|-----------|------------------------------------------|----------------------------------|-----------------|
| document  | {document} (required), {title}, {n}      | write `Q:` / `A:` pairs about it | parse_qa        |
| prompt    | {prompt} (required): the last user turn  | answer the prompt                | parse_answer    |

Literal braces in a template are written `{{` and `}}`. Standard library only: the recipe
loader checks templates through `SynthDataConfig`.
"""

from __future__ import annotations

import hashlib
import string
from dataclasses import dataclass

FIELDS = {"document": ("document", "title", "n"), "prompt": ("prompt",)}

BUILTIN = {
    # (seed kind, text). Q:/A: lines are what `parsing.parse_qa` reads.
    "qa_from_document": ("document", (
        "Read the document below and write {n} question-and-answer pairs about it. Each question "
        "must be answerable from the document alone; each answer must be correct, complete and "
        "understandable without the document. Write every pair on two lines, exactly like this:\n"
        "Q: <the question>\nA: <the answer>\n\n"
        "Document:\n{document}")),
    # The Llama 3 way for prompts with a checkable answer (reference A7): sample answers to the
    # prompt as it is, keep those whose final answer is right.
    "answer_prompt": ("prompt", "{prompt}"),
    "answer_step_by_step": ("prompt", (
        "{prompt}\n\nWork through it step by step, then finish with a sentence that ends in "
        "\"the answer is\" followed by the final answer.")),
}


@dataclass(frozen=True)
class Template:
    name: str  # the built-in's name, or `recipe:<sha1 of the text>` for a recipe's own
    kind: str  # "document" or "prompt": which seeds it renders
    text: str

    def render(self, **fields) -> str:
        return self.text.format(**fields)


def resolve_template(value: str, kind: str) -> Template:
    """The built-in named `value`, or `value` itself as template text for seeds of `kind`.

    Raises ValueError naming the problem: an unknown name, a built-in for the other seed kind,
    a field the kind does not have, positional `{}` fields, unbalanced braces, or no `{document}`
    / `{prompt}` field.
    """
    if "{" not in value:
        if value not in BUILTIN:
            known = ", ".join(name for name, (k, _) in BUILTIN.items() if k == kind)
            raise ValueError(f"unknown template {value!r} (built-in {kind} templates: {known}; or "
                             f"write the template text itself, with a {{{FIELDS[kind][0]}}} field)")
        builtin_kind, text = BUILTIN[value]
        if builtin_kind != kind:
            raise ValueError(f"template {value!r} renders {builtin_kind} seeds, not {kind} seeds")
        return Template(value, kind, text)
    _check_fields(value, kind)
    return Template(f"recipe:{hashlib.sha1(value.encode()).hexdigest()[:8]}", kind, value)


def _check_fields(text: str, kind: str) -> None:
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as err:  # "Single '}' encountered in format string", ...
        raise ValueError(f"not a valid format string ({err}); write literal braces as "
                         "{{ and }}") from None
    allowed = FIELDS[kind]
    for name in names:
        if name not in allowed:
            shown = "{}" if name == "" else "{" + name + "}"
            raise ValueError(f"unknown field {shown} in a {kind} template (fields: "
                             + ", ".join("{" + f + "}" for f in allowed) + ")")
    if allowed[0] not in names:
        raise ValueError(f"a {kind} template needs a {{{allowed[0]}}} field")
