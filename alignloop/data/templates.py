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
# A two-turn chat whose rendering shows what the template writes after an assistant's content.
_PROBE_ANSWER = "Probe answer 7."
_PROBE_CHAT = [{"role": "user", "content": "Probe question?"},
               {"role": "assistant", "content": _PROBE_ANSWER}]


def llama3_template() -> str:
    """alignloop's Llama 3 template (reference section E), with generation markers."""
    return (importlib.resources.files("alignloop.data") / "chat_templates" / "llama3.jinja").read_text()


def has_generation_markers(template: str) -> bool:
    return bool(GENERATION_TAG.search(template))


def end_of_turn_token(tokenizer) -> str | None:
    """The special token the chat template closes an assistant turn with, or None.

    Read from the template itself rather than from `eos_token`, which need not be it: a ChatML
    model's tokenizer may name `<|endoftext|>` as eos while its turns end with `<|im_end|>`. It is
    the first token after an assistant's content in a rendered conversation, when that token is
    a special (added) token: `<|eot_id|>` for Llama 3, `<|im_end|>` for ChatML. None when the
    template writes nothing special there, or cannot render a user/assistant exchange.
    """
    try:
        text = tokenizer.apply_chat_template(_PROBE_CHAT, tokenize=False)
    except Exception:  # a template that refuses the probe (jinja raise_exception, odd roles)
        return None
    at = text.rfind(_PROBE_ANSWER)
    if at < 0:  # the template rewrote the content
        return None
    after = text[at + len(_PROBE_ANSWER):].lstrip()
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return special.get(ids[0]) if ids else None


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
