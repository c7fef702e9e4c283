"""A LoRA adapter directory as a recipe's starting model (`model.path: runs/x/round_1/sft/model`).

A stage that trains a new LoRA on such a model must save an adapter whose base is the adapter
*merged into its own base*: saved on the raw base, the new adapter would silently drop the first
one (found in benchmarks/loop_vs_sft.py, where arms b and c start from arm a's SFT adapter). So
`model.path` that holds an adapter_config.json resolves to that merged model, written once into
`<cache>/merged-<fingerprint of the adapter directory>` (cache as alignloop.models.gguf), with the
adapter's tokenizer; an adapter on an adapter resolves recursively. The fingerprint enters run
keys (model_identity), so a retrained adapter at the same path is a different model.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from alignloop.manifest import fingerprint
from alignloop.models.gguf import cache_root

logger = logging.getLogger("alignloop.models")


def is_adapter(path) -> bool:
    return path is not None and (Path(str(path)) / "adapter_config.json").is_file()


def merged_dir(path) -> Path:
    return cache_root() / f"merged-{fingerprint(path)}"


def merge_adapter(path, base_path: str) -> Path:
    """The merged model of the adapter at `path` (on `base_path`, already resolved), written once
    under a lock into a temporary sibling and renamed into place."""
    from filelock import FileLock

    final = merged_dir(path)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f"{final.name}.lock")):
        if final.is_dir():  # another process merged it while we waited
            return final
        logger.info("merging the adapter %s into %s (a recipe's starting model)", path, final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _write_merged(Path(path), base_path, tmp)
            (tmp / "alignloop_merged.json").write_text(json.dumps(
                {"adapter": str(Path(path).resolve()), "base": base_path}, indent=2))
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _write_merged(path: Path, base_path: str, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_model(path, AutoModelForCausalLM, base_path=base_path, dtype="auto").save_pretrained(out)
    sources = [p for p in (path, Path(base_path)) if (p / "tokenizer_config.json").is_file()]
    if sources:  # the adapter's tokenizer (chat template included), else its base's
        AutoTokenizer.from_pretrained(str(sources[0])).save_pretrained(out)


def merged_model(path, model_class, *, base_path: str | None = None, **kwargs):
    """The adapter at `path` on its base (`base_path`, else the adapter's own record), merged;
    `kwargs` go to `model_class.from_pretrained`. A causal-LM adapter on another head (a reward
    model from an SFT adapter) is applied by the generic PeftModel to the shared body."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(path))
    base = model_class.from_pretrained(base_path or config.base_model_name_or_path, **kwargs)
    return merge_into(base, path, config)


def merge_into(base, path, config=None):
    """The adapter at `path` applied to the loaded model `base` and merged into it (tied
    embeddings stay tied unless the adapter changes one side: `untie_adapted_embeddings`)."""
    from peft import PeftConfig, PeftModel

    config = config or PeftConfig.from_pretrained(str(path))
    if config.task_type == "CAUSAL_LM" and not hasattr(base, "prepare_inputs_for_generation"):
        config.task_type = None
    adapted = PeftModel.from_pretrained(base, str(path), config=config)
    untie_adapted_embeddings(adapted)
    return adapted.merge_and_unload()


def untie_adapted_embeddings(model) -> bool:
    """Gives a LoRA-adapted embedding of a tied pair its own copy of the matrix; True if it did.

    With tied embeddings one matrix E serves as input embedding and output layer. LoRA on one
    side (`target_modules: [..., embed_tokens]`, or `lm_head` where the trainer allows it; TRL's
    SFTTrainer refuses that) changes that side only: the adapter computes with E + dE there and
    E on the other side. Merging into the shared E would move both sides (the logits then differ
    from the adapter's; peft only warns). So the adapted side's base layer is cloned before
    merging and the config says untied: the merged model equals the adapter on its base.
    "all-linear" leaves both embeddings alone and `modules_to_save` trains a copy, so neither
    unties anything: the merged model stays tied.
    """
    import torch
    from peft.tuners.lora import LoraLayer

    inner = model.get_base_model()
    sides = [inner.get_input_embeddings(), inner.get_output_embeddings()]
    if any(side is None for side in sides):
        return False
    layers = [side.get_base_layer() if isinstance(side, LoraLayer) else side for side in sides]
    weights = [getattr(layer, "weight", None) for layer in layers]
    if weights[0] is None or weights[0] is not weights[1]:  # not tied
        return False
    adapted = [layer for side, layer in zip(sides, layers) if isinstance(side, LoraLayer)]
    for layer in adapted:
        layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    if adapted:
        inner.config.tie_word_embeddings = False
        logger.info("the adapter changes a tied embedding: the merged model is saved untied")
    return bool(adapted)
