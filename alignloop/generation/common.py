"""What every generation backend shares: sampling settings, the Sample a backend returns, the
model a directory names, the prompt rendering and the stop tokens.

Standard library only at import time: this module is also imported inside the vLLM virtualenv
(transformers 5.19, no trl or peft), and by a server client that never loads a model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alignloop.data.templates import end_of_turn_token
from alignloop.pipeline.errors import StageError

# End of turn, end of text, end of message (Llama 3 chat tokens, reference section E): a chat
# answer stops at whichever comes first.
STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


class GeneratorError(StageError):
    """A generator cannot start or answer (no vLLM, a server that does not come up, an adapter
    vLLM cannot serve); the message says what would fix it."""


@dataclass
class Sample:
    """One completion, from any backend."""

    text: str                    # decoded completion, special tokens removed
    token_ids: list[int]         # the sampled completion tokens (the stop token included)
    logprobs: list[float] | None  # log-prob of each sampled token under the model, if reported
    finish_reason: str           # "stop" (end of turn / text) or "length"


@dataclass
class SamplingSettings:
    n: int = 1
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


def check_settings(settings: SamplingSettings) -> None:
    if settings.n > 1 and settings.temperature == 0:
        raise ValueError("n > 1 samples with temperature 0 would repeat the same greedy answer; "
                         "set a temperature > 0")


@dataclass
class ModelRef:
    """A model directory as a backend needs it: a full model, or a LoRA adapter over a base."""

    path: str                # what the caller named
    base: str                # the full model to load (the adapter's base, or `path` itself)
    adapter: str | None      # the LoRA adapter directory, if `path` is one
    tokenizer: str           # where the tokenizer and chat template come from
    lora_rank: int | None = None
    modules_to_save: list[str] | None = None
    # peft target_parameters: LoRA on 3D parameters (an MoE's routed experts, docs/moe.md)
    target_parameters: list[str] | None = None


def resolve_model(model_dir) -> ModelRef:
    """Reads adapter_config.json when `model_dir` is an adapter; its tokenizer (the one its stage
    saved) wins over the base's."""
    path = Path(model_dir)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        return ModelRef(path=str(model_dir), base=str(model_dir), adapter=None, tokenizer=str(model_dir))
    try:
        config = json.loads(config_file.read_text())
        base = config["base_model_name_or_path"]
    except (ValueError, KeyError) as err:
        raise GeneratorError(f"{config_file}: cannot read base_model_name_or_path ({err})") from err
    has_tokenizer = (path / "tokenizer_config.json").is_file()
    return ModelRef(path=str(model_dir), base=str(base), adapter=str(model_dir),
                    tokenizer=str(model_dir) if has_tokenizer else str(base),
                    lora_rank=config.get("r"), modules_to_save=config.get("modules_to_save"),
                    target_parameters=config.get("target_parameters"))


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref.tokenizer)


def render(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Token ids of each chat prompt with the assistant generation prompt (the model's template)."""
    return [list(tokenizer.apply_chat_template(p, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]) for p in prompts]


def stop_token_ids(tokenizer, configured=None) -> list[int]:
    """The tokenizer's eos, the model's generation_config eos ids (`configured`: an int, a list or
    None), the token the chat template ends an assistant turn with, and the Llama 3 end tokens
    the vocabulary has.

    The template's end-of-turn token matters where eos is not it: a ChatML model whose eos is
    `<|endoftext|>` ends its turns with `<|im_end|>`, and without it a chat answer would run on
    into the next turn.
    """
    stops = {tokenizer.eos_token_id}
    stops.update(configured if isinstance(configured, list) else [configured])
    for token in filter(None, (end_of_turn_token(tokenizer), *STOP_TOKENS)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            stops.add(token_id)
    return sorted(t for t in stops if t is not None)


def configured_eos(model_dir: str):
    """eos_token_id of `model_dir`/generation_config.json (None when there is none)."""
    file = Path(model_dir) / "generation_config.json"
    return json.loads(file.read_text()).get("eos_token_id") if file.is_file() else None


def cut_at_stop(token_ids: list[int], stops: list[int]) -> tuple[list[int], str]:
    """The sampled ids up to and including the first stop token, and the finish reason."""
    end = next((i for i, t in enumerate(token_ids) if t in stops), None)
    return (token_ids, "length") if end is None else (token_ids[:end + 1], "stop")
