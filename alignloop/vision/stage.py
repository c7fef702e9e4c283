"""Vision stages: adapter pretraining, vision SFT and vision DPO (Llama 3 §7.4-7.5, reference C1).

One entry function with the stage contract, `run(cfg, ctx, out_dir) -> metrics`, for the stages
`vision_adapter`, `vision_sft`, `vision_reward` and `vision_dpo` (recipe section
`vision.<adapter|sft|reward|dpo>`; the reward model is in alignloop.vision.reward, rejection
sampling in alignloop.vision.rejection_sampling). A stage after rejection sampling also trains on
what it kept (`ctx.inputs`: best samples for sft, pairs for dpo).
The trainer is transformers' `Trainer`; our part is the model (loaded, frozen, LoRA), the data
(alignloop.vision.data's collator), the DPO loss, and the artifacts:

    <out_dir>/model/         the model in HF Mllama format (+ tokenizer, image processor)
    <out_dir>/data.jsonl     the records trained on
    <out_dir>/metrics.json   losses, steps, timing, what was trained

What is trained (reference C1): the language model stays frozen; the encoder, projector,
cross-attention layers and the image token's rows train (`train` picks among them). `lora`
adds LoRA adapters on the language model's linear layers, merged into it when the stage saves.
Trainer checkpoints hold only the trainable tensors (the frozen LM is reloaded from the start
model), so resuming a killed run reloads them on top of it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer

from alignloop.config import Recipe, resolved_precision
from alignloop.data.readers import write_jsonl
from alignloop.data.sources import format_report, load_sources
from alignloop.pipeline.context import StageContext
from alignloop.pipeline.errors import StageError
from alignloop.vision.config import VisionTrainSection, training_arguments
from alignloop.vision.data import IMAGE_TOKEN

logger = logging.getLogger("alignloop.vision")


def run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    """Trains `ctx.policy` (an Mllama checkpoint, or for the first stage of a `start: new`
    recipe the text model) with the section of `ctx.name`; writes the artifacts above."""
    from alignloop.sft.stage import tensorboard_logs

    with tensorboard_logs(ctx.log_dir):
        return _run(cfg, ctx, out_dir)


def _run(cfg: Recipe, ctx: StageContext, out_dir: Path) -> dict:
    from alignloop.checkpoints import last_checkpoint

    from alignloop.vision.data import VisionCollator

    start = time.time()
    phase = ctx.name.removeprefix("vision_")
    section: VisionTrainSection = getattr(cfg.vision, phase)
    tokenizer = load_vision_tokenizer(cfg, ctx.policy)
    model = load_vision_model(cfg, ctx.policy, tokenizer)
    processor = image_processor_for(cfg, model)
    records, report = _records(cfg, section, ctx)
    logger.info("%s data:\n%s", ctx.label, format_report(report))
    if phase == "reward":
        return _run_reward(cfg, ctx, section, (tokenizer, model, processor), records, report, start, out_dir)
    trained = prepare_for_training(model, section, ctx.seed)
    args = training_arguments(cfg, section, ctx.work_dir / "checkpoints")
    collator, cached = VisionCollator(tokenizer, processor, section.kind, section.max_length), {}
    if is_llama3v_model(model):
        collator, cached = llama3v_collator(cfg, section, (tokenizer, model, processor), records)
    trainer_class, extra = AdapterTrainer, {}
    if phase == "dpo":
        records = with_reference_logprobs(model, records, collator, args.per_device_train_batch_size)
        collator = _WithReference(collator)
        trainer_class, extra = VisionDPOTrainer, {"beta": section.beta, "nll_weight": section.nll_weight}
    trainer = trainer_class(model=model, args=args, train_dataset=records, data_collator=collator, **extra)
    last = last_checkpoint(args.output_dir)
    if last:
        logger.info("resuming %s from %s", ctx.label, last)
    result = trainer.train(resume_from_checkpoint=last)
    model = finish_training(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_vision_model(model, tokenizer, processor, out_dir / "model")
    write_jsonl(out_dir / "data.jsonl", [{k: v for k, v in r.items() if k != "_reference"} for r in records])
    metrics = {
        "stage": ctx.name, "start_model": ctx.policy, "resumed_from": last,
        "train_loss": result.training_loss, "steps": result.global_step,
        "losses": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        "trained": trained, "train_seconds": round(time.time() - start, 1), "data": report,
        **cached,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


def llama3v_collator(cfg: Recipe, section: VisionTrainSection, parts, records: list[dict]):
    """The Llama 3-V batches for `section`, and what the feature cache did. With
    `vision.llama3v.cache_features` the frozen encoder's features of every image in `records`
    are computed once into the cache (images already there are not encoded again, e.g. in the
    stage after the adapter stage) and batches carry them as `image_features`: training never
    runs the encoder."""
    from alignloop.data.vision_records import image_paths
    from alignloop.vision.llama3v import CachedFeatures, FeatureCache, Llama3VCollator

    tokenizer, model, processor = parts
    options = cfg.vision.llama3v
    collator = Llama3VCollator(tokenizer, processor, model.image_tokens, section.kind,
                               section.max_length, pixels=not options.cache_features)
    if not options.cache_features:  # live pixel_values; the model takes no image_keys
        return lambda records: {k: v for k, v in collator(records).items() if k != "image_keys"}, {}
    cache = FeatureCache(options.cache_dir or Path(cfg.output_dir) / "feature_cache", model.encoder,
                         processor)
    paths = [path for record in records for path in image_paths(record)]
    started = time.time()
    computed = cache.precompute(paths)
    logger.info("feature cache %s: %d image(s) encoded, %d already there (%.1f s)", cache.dir,
                computed, len(set(paths)) - computed, time.time() - started)
    return CachedFeatures(collator, cache), {
        "feature_cache": str(cache.dir), "features_computed": computed,
        "features_seconds": round(time.time() - started, 1)}


def _records(cfg: Recipe, section: VisionTrainSection, ctx: StageContext) -> tuple[list[dict], list]:
    """The section's data, plus what vision rejection sampling kept for this stage (`ctx.inputs`:
    "rs_best" vision_chat records for sft, "rs_pairs" vision_preference records for dpo)."""
    from alignloop.data.readers import read_records

    phase = ctx.name.removeprefix("vision_")
    records, report = [], []
    if section.data:
        loaded = load_sources(section.data, section.kind, cfg.bad_records, ctx.seed)
        records, report = list(loaded.records), list(loaded.report)
    name = {"vision_chat": "rs_best", "vision_preference": "rs_pairs"}.get(section.kind)
    for path in ctx.inputs.get(name, []) if name else []:
        rows = read_records(path, section.kind).records
        records += rows
        report.append({"source": f"{name}:{path}", "read": len(rows), "skipped": 0, "reasons": [],
                       "used": len(rows)})
    if not records:
        raise StageError(f"{ctx.label}: no training data (vision.{phase}.data is empty or every "
                         "record was skipped, and rejection sampling kept nothing for it)")
    return records, report


# ---------------------------------------------------------------------------------------------
# Models on disk: a Llama text checkpoint (start: new) or HF Mllama (every stage's output)


def is_llama3v(path: str | Path) -> bool:
    """A Llama 3-V model directory (alignloop.vision.llama3v.Llama3V.save)."""
    return (Path(path) / "llama3v.json").is_file()


def is_llama3v_model(model) -> bool:
    from alignloop.vision.llama3v import Llama3V

    return isinstance(model, Llama3V)


def is_mllama(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "mllama"


def load_vision_tokenizer(cfg: Recipe, path: str):
    """The recipe's tokenizer with `<|image|>` as one token: Llama 3.1's tokenizer gets it added
    as a special token (id 128256, the first learnable row, as in Llama 3.2 Vision)."""
    from alignloop.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, path)
    if len(tokenizer(IMAGE_TOKEN, add_special_tokens=False)["input_ids"]) != 1:
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def load_vision_model(cfg: Recipe, path: str, tokenizer=None):
    """An Mllama checkpoint through `from_mllama`, or a Llama text checkpoint with a fresh adapter
    (`vision.adapter_config`), in the recipe's dtype."""
    from transformers import MllamaForConditionalGeneration

    from alignloop.models.loading import torch_dtype
    from alignloop.vision.convert import from_mllama
    from alignloop.vision.model import build

    from alignloop.kernels import ATTENTION, register

    if cfg.model.attn_implementation == ATTENTION:
        register()  # transformers must know the name before from_pretrained
    dtype = torch_dtype(cfg.model, resolved_precision(cfg))
    if cfg.vision.architecture == "llama3v":
        from alignloop.vision import llama3v

        try:
            model = (llama3v.Llama3V.load(path, dtype) if is_llama3v(path) else
                     llama3v.build(path, cfg.vision.llama3v, tokenizer, dtype))
        except ValueError as err:  # e.g. image_tokens against a checkpoint encoder's patches
            raise StageError(f"vision.llama3v: {err}") from None
        model.language_model.set_attn_implementation(cfg.model.attn_implementation)
        return model
    if is_mllama(path):
        mllama = MllamaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=cfg.model.attn_implementation)
        return from_mllama(mllama)
    if cfg.vision.start == "mllama":
        raise StageError(f"{path}: vision.start is 'mllama' but this is not an Mllama checkpoint "
                         "(config.json model_type 'mllama'); use start: new for a Llama text model")
    model = build(path, cfg.vision.adapter_config, tokenizer, dtype=dtype)
    model.language_model.set_attn_implementation(cfg.model.attn_implementation)
    return model


def image_processor_for(cfg: Recipe, model):
    from alignloop.vision.data import image_processor

    if is_llama3v_model(model):  # SigLIP's: resize to the encoder's image size, mean and std 0.5
        from alignloop.vision.llama3v import image_processor as siglip_processor

        return siglip_processor(model.encoder)
    tile = cfg.vision.tile_size or model.vision_config.image_size
    return image_processor(tile, model.vision_config.max_num_tiles)


def save_vision_model(model, tokenizer, processor, out: Path) -> None:
    """HF Mllama format (safetensors), loadable by transformers and vLLM, with the tokenizer and
    the image processor beside it."""
    from alignloop.vision.convert import to_mllama

    if is_llama3v_model(model):  # lm/, encoder/, projector.safetensors (no Mllama form)
        model.save(out)
    else:
        to_mllama(model).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)


# ---------------------------------------------------------------------------------------------
# What trains


def prepare_for_training(model, section: VisionTrainSection, seed: int = 0) -> dict:
    """Freezes the language model, unfreezes the parts in `section.train`, adds LoRA on the
    language model with `section.lora` (initialised from `seed`, so that a run does not depend on
    what drew random numbers before it). Returns counts of trainable parameters by part."""
    parts = [part for part in section.train if part != "score"]  # the reward model's head: its own
    model.requires_grad_(False)
    for p in model.adapter_parameters(parts):
        p.requires_grad_(True)
    counts = {part: sum(p.numel() for p in model.adapter_parameters([part])) for part in parts}
    if section.lora is not None:
        from peft import get_peft_model

        from alignloop.models.loading import lora_config

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model.language_model = get_peft_model(model.language_model, lora_config(section.lora))
        counts["lm_lora"] = sum(p.numel() for n, p in model.language_model.named_parameters()
                                if p.requires_grad)
    model.train()
    return counts


def finish_training(model):
    """Merges LoRA adapters into the language model (the saved model is a plain Mllama)."""
    from peft import PeftModel

    if isinstance(model.language_model, PeftModel):
        model.language_model = model.language_model.merge_and_unload()
    return model.eval()


class AdapterTrainer(Trainer):
    """`Trainer` whose checkpoints hold only the trainable tensors (a non-PreTrainedModel would
    otherwise be saved whole, and tied embeddings refuse to save as safetensors); resuming loads
    them non-strictly over the start model, as Trainer does for such models."""

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        from safetensors.torch import save_file

        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        trainable = {name: p.detach().contiguous().cpu() for name, p in self.model.named_parameters()
                     if p.requires_grad}
        save_file(trainable, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})
        (Path(output_dir) / "training_args.json").write_text(self.args.to_json_string())

    def _issue_warnings_after_load(self, load_result) -> None:
        """The frozen tensors are missing from our checkpoints by design; a trainable one must not be."""
        trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
        lost = sorted(trainable & set(load_result.missing_keys))
        if lost or load_result.unexpected_keys:
            raise RuntimeError(f"checkpoint does not match the model being trained: missing {lost[:3]}, "
                               f"unexpected {load_result.unexpected_keys[:3]} (was it written under "
                               "another `train` or `lora` setting?)")


# ---------------------------------------------------------------------------------------------
# Vision DPO (Llama 3 §7.5; the loss as reference A5: sigmoid DPO + NLL on the chosen answer)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, L, V), labels (B, L) with -100 off the answer -> (sum of log-probs of the label
    tokens (B,), their count (B,)); position t predicts label t + 1."""
    labels = labels[:, 1:]
    keep = labels != -100
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                      # (B, L-1, V)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)      # (B, L-1)
    return (picked * keep).sum(-1), keep.sum(-1)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged; all inputs (B,)."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def _pair_forward(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over [chosen; rejected] -> (chosen log-probs, rejected log-probs, chosen counts)."""
    both = {k: torch.cat([batch["chosen"][k], batch["rejected"][k]]) for k in batch["chosen"]}
    labels = both.pop("labels")
    logp, count = sequence_logprobs(model(**both).logits, labels)
    chosen, rejected = logp.chunk(2)
    return chosen, rejected, count.chunk(2)[0]


@torch.no_grad()
def with_reference_logprobs(model, records: list[dict], collator, batch_size: int) -> list[dict]:
    """Copies of the records with `_reference` = [log p_ref(chosen), log p_ref(rejected)] under
    the model as the stage starts (the DPO reference, computed once)."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(records), batch_size):
        chunk = records[i:i + batch_size]
        batch = collator(chunk)
        batch = {side: {k: v.to(model.device) for k, v in part.items()} for side, part in batch.items()}
        chosen, rejected, _ = _pair_forward(model, batch)
        out += [{**r, "_reference": [c, j]} for r, c, j in zip(chunk, chosen.tolist(), rejected.tolist())]
    model.train(was_training)
    return out


class _WithReference:
    def __init__(self, collator):
        self.collator = collator

    def __call__(self, records: list[dict]) -> dict:
        return {**self.collator(records), "reference": torch.tensor([r["_reference"] for r in records])}


class VisionDPOTrainer(AdapterTrainer):
    def __init__(self, *args, beta: float, nll_weight: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta, self.nll_weight = beta, nll_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        reference = inputs.pop("reference")  # (B, 2)
        chosen, rejected, count = _pair_forward(model, inputs)
        loss = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], self.beta)
        if self.nll_weight > 0:
            loss = loss + self.nll_weight * (-chosen.sum() / count.sum().clamp(min=1))
        return (loss, None) if return_outputs else loss


# ---------------------------------------------------------------------------------------------
# The vision reward model (Llama 3 §7.5): alignloop.vision.reward


def _run_reward(cfg: Recipe, ctx: StageContext, section, parts, records, report, start: float,
                out_dir: Path) -> dict:
    """Trains a score head with the encoder and cross-attention layers (self-attention frozen);
    writes model/ (Mllama + score.safetensors), data.jsonl and metrics.json with the held-out
    pairwise accuracy before and after (eval_data, else the first 256 training pairs)."""
    from alignloop.checkpoints import last_checkpoint

    from alignloop.vision.data import VisionCollator
    from alignloop.vision.reward import (VisionRewardModel, load_text_reward_model, pairwise_accuracy,
                                         save_score)

    tokenizer, vision, processor = parts
    model = VisionRewardModel(vision)
    if section.text_reward_model:
        load_text_reward_model(model, section.text_reward_model)
    trained = prepare_for_training(vision, section, ctx.seed)
    if "score" in section.train:
        model.score.weight.requires_grad_(True)
        trained["score"] = model.score.weight.numel()
    args = training_arguments(cfg, section, ctx.work_dir / "checkpoints")
    collator = VisionCollator(tokenizer, processor, "vision_preference", section.max_length)
    held_out = (list(load_sources(section.eval_data, "vision_preference", cfg.bad_records, ctx.seed).records)
                if section.eval_data else records[:256])
    before = pairwise_accuracy(model, held_out, collator, args.per_device_eval_batch_size)
    trainer = VisionRewardTrainer(model=model, args=args, train_dataset=records, data_collator=collator,
                                  penalty=section.penalty)
    last = last_checkpoint(args.output_dir)
    result = trainer.train(resume_from_checkpoint=last)
    after = pairwise_accuracy(model, held_out, collator, args.per_device_eval_batch_size)
    finish_training(vision)

    out_dir.mkdir(parents=True, exist_ok=True)
    save_vision_model(vision, tokenizer, processor, out_dir / "model")
    save_score(model, out_dir / "model")
    write_jsonl(out_dir / "data.jsonl", records)
    metrics = {
        "stage": ctx.name, "start_model": ctx.policy, "resumed_from": last,
        "train_loss": result.training_loss, "steps": result.global_step,
        "losses": [round(e["loss"], 4) for e in trainer.state.log_history if "loss" in e],
        "accuracy_before": before, "accuracy": after, "eval_pairs": len(held_out),
        "held_out": bool(section.eval_data), "trained": trained,
        "train_seconds": round(time.time() - start, 1), "data": report,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    return metrics


class VisionRewardTrainer(AdapterTrainer):
    def __init__(self, *args, penalty: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from alignloop.vision.reward import reward_loss

        loss = reward_loss(model(**inputs["chosen"]), model(**inputs["rejected"]), self.penalty)
        return (loss, None) if return_outputs else loss
