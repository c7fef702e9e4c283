"""Chat templates: which one a run uses, and whether it marks the assistant's tokens.

A template with `{% generation %}` ... `{% endgeneration %}` around each assistant turn lets the
tokenizer return the assistant-token mask itself. A template without them still works: the mask is
then found by rendering the conversation one turn at a time (see `alignloop.data.masks`), which
is the same as adding the markers, as long as each rendered prefix is a prefix of the whole.
"""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def llama3_template() -> str:
    """alignloop's Llama 3 template (reference section E), with generation markers."""
    return (importlib.resources.files("alignloop.data") / "chat_templates" / "llama3.jinja").read_text()


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_TAG.search(template))


def select_template(tokenizer, choice: str) -> str:
    """The template for `choice` ("auto", "llama3" or a .jinja path), set on `tokenizer` too.

    "auto" keeps the tokenizer's own template and fails clearly when it has none.
    """
    if choice == "llama3":
        template = llama3_template()
    elif choice == "auto":
        template = tokenizer.chat_template
        if not template:
            raise ValueError("the tokenizer has no chat template; set model.chat_template to "
                             "'llama3' or to a .jinja file")
        if isinstance(template, dict):  # several named templates: the default one is used for chat
            template = template.get("default") or next(iter(template.values()))
    else:
        path = Path(choice)
        if not path.is_file():
            raise ValueError(f"model.chat_template: no such file: {path}")
        template = path.read_text(encoding="utf-8")
    tokenizer.chat_template = template
    return template
