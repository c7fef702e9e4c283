"""The glue between alignloop's DPO stage and TRL's DPOTrainer (trl 1.16).

Two small additions, no patching:

- `FormattingMaskCollator`: TRL's preference collator, then Llama 3's formatting-token mask
  (`alignloop.dpo.masking`) applied to the `completion_mask` it returns. TRL derives everything
  from that mask: the labels of the policy and reference forwards (hence both sequences' log-probs
  in the sigmoid term), the NLL term on the chosen response, and the precomputed reference
  log-probs (computed through the same collator). Zeroing a position there removes it from all.
- `LlamaDPOTrainer`: the NLL term averaged per sequence (Pang et al. 2024, Llama 3) instead of
  TRL's per token, unless `dpo.nll_normalization: token`; logs the loss terms separately
  (`loss/nll`, `loss/dpo`), which TRL sums into one `loss`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from alignloop.dpo.masking import FormattingIds, formatting_ids, loss_mask
from alignloop.kernels import fused_head
from alignloop.losses import chosen_nll
from alignloop.models.loading import load_model, lora_config
from alignloop.training import moe_aux_coef


@dataclass
class FormattingMaskCollator(DataCollatorForPreference):
    """Pads pairs as TRL does (rows [chosen..., rejected...]) and masks the formatting tokens.

    `formatting`: the tokenizer's formatting ids, or None to keep TRL's mask as it is.
    """

    formatting: FormattingIds | None = None

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)
        if self.formatting is not None:
            ids, mask = batch["input_ids"].tolist(), batch["completion_mask"].tolist()  # (2B, T)
            masked = [loss_mask(row, keep, self.formatting) for row, keep in zip(ids, mask)]
            batch["completion_mask"] = torch.tensor(masked, dtype=batch["completion_mask"].dtype)
        return batch


class _FirstOutput:
    """Calls the policy and keeps its first output.

    TRL's `_compute_loss` calls the `model` it is given exactly once for the loss (the reference
    goes through `self.ref_model`, or `self.model` with the adapter disabled), so `output.log_probs`
    are the per-token log-probs the loss was computed from.
    """

    def __init__(self, model):
        self.model, self.output = model, None

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        if self.output is None:
            self.output = out
        return out


class LlamaDPOTrainer(DPOTrainer):
    """DPOTrainer with Llama 3's NLL term and its terms logged.

    TRL's "sft" loss type averages the NLL over the chosen tokens of the micro-batch; with
    `nll_normalization="sequence"` (the default) the loss swaps that term for the per-sequence
    average (`chosen_nll`), computed from the same per-token log-probs, so the gradient is the
    per-sequence one. `loss/nll` (the NLL term in use, unweighted) and `loss/dpo` (the preference
    term: loss - nll_weight * nll) are logged whenever the NLL term is on, so the logged `loss`
    is visibly `loss/dpo + nll_weight * loss/nll` (reference A5), plus coef * `aux_loss` for an
    MoE policy (TRL's load-balancing term, docs/moe.md)."""

    def __init__(self, *args, nll_normalization: str = "sequence", **kwargs):
        if nll_normalization not in ("sequence", "token"):
            raise ValueError(f"dpo.nll_normalization: {nll_normalization!r} is not sequence or token")
        super().__init__(*args, **kwargs)
        if nll_normalization == "sequence" and self.use_weighting and "sft" in self.loss_types:
            raise ValueError("dpo.nll_normalization: sequence does not combine with use_weighting "
                             "(WPO weights TRL's per-token NLL term); set nll_normalization: token")
        self.nll_normalization = nll_normalization

    def _compute_loss(self, model, inputs, return_outputs):
        policy = _FirstOutput(model)
        result = super()._compute_loss(policy, inputs, return_outputs)
        if "sft" not in self.loss_types:
            return result
        loss = result[0] if return_outputs else result
        weight = self.loss_weights[self.loss_types.index("sft")]
        log_probs, mask = policy.output.log_probs, inputs["completion_mask"]
        nll = chosen_nll(log_probs, mask, self.nll_normalization)
        if self.nll_normalization == "sequence":  # TRL added weight * the per-token term
            loss = loss + weight * (nll - chosen_nll(log_probs, mask, "token"))
        nll, total = nll.detach(), loss.detach()
        preference = total - weight * nll
        if self.aux_loss_enabled:  # an MoE policy: TRL added coef * its load-balancing loss too
            preference = preference - self.router_aux_loss_coef * policy.output.aux_loss.detach()
        terms = self.accelerator.gather(torch.stack([nll, preference])).view(-1, 2)
        nll_mean, dpo_mean = terms.mean(dim=0).tolist()
        mode = "train" if self.model.training else "eval"
        # TRL averages self._metrics over the logging window and adds them to the log
        self._metrics[mode]["loss/nll"].append(nll_mean)
        self._metrics[mode]["loss/dpo"].append(dpo_mean)
        return (loss, result[1]) if return_outputs else loss


def make_trainer(cfg, path: str, tokenizer, train_set, args, where=None) -> LlamaDPOTrainer:
    """The trainer for `cfg.dpo` starting from the model at `path`, on a dataset of
    prompt/chosen/rejected conversations; `args` from `alignloop.training.trl_config`. LoRA
    targets are resolved on the model (docs/moe.md; `where` names the recipe key of a target
    that matches nothing) and an MoE policy's aux-loss coefficient set in `args`.

    The reference is the starting model: for LoRA/QLoRA the adapter-disabled base (TRL's default
    with no ref_model); for a full fine-tune the precomputed log-probs of the model before
    training, or, when not precomputing, a frozen copy loaded here.
    """
    section = cfg.dpo
    model = load_model(cfg, path, quantize=section.method == "qlora",
                       quantization=section.quantization)
    ref_model = None
    if section.method == "full" and not args.precompute_ref_log_probs:
        # Loaded here rather than by TRL, which reloads `model.config._name_or_path`: for a policy
        # that load_model merged from an adapter, that is the adapter's base, not the policy.
        ref_model = load_model(cfg, path)
    collator = FormattingMaskCollator(
        pad_token_id=tokenizer.pad_token_id, max_length=args.max_length,
        truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
        formatting=formatting_ids(tokenizer) if section.mask_formatting_tokens else None)
    peft = None
    if section.method != "full":
        peft = lora_config(section.lora, model=model, key="dpo.lora", where=where)
    moe_aux_coef(model, cfg.moe, args)
    trainer = LlamaDPOTrainer(model=model, ref_model=ref_model, args=args, data_collator=collator,
                              train_dataset=train_set, processing_class=tokenizer,
                              nll_normalization=section.nll_normalization, peft_config=peft)
    if use_fused_loss(section, args, fused_head.vocab_size(model)):
        # per-token log-probs of policy and reference through our fused linear + cross-entropy;
        # TRL's sigmoid loss and the NLL term read them as before (docs/long_context.md)
        fused_head.install(trainer.model)
        if trainer.ref_model is not None:
            fused_head.install(trainer.ref_model)
    return trainer


def use_fused_loss(section, args, vocab_size: int | None = None) -> bool:
    """`dpo.fused_loss` resolved; "auto" stays off with WPO weighting (`use_weighting`), which
    needs a statistic (log sum p^2) that our head does not compute."""
    if section.fused_loss is True and args.use_weighting:
        raise ValueError("dpo.fused_loss: true does not support use_weighting (WPO); set one of "
                         "them to false")
    return (fused_head.wanted(section.fused_loss, args.max_length, vocab_size)
            and not args.use_weighting)


def completion_log_probs(trainer: DPOTrainer, dataset, limit: int = 64) -> dict[str, float] | None:
    """Mean summed log-prob of the chosen and of the rejected responses (loss tokens only) over
    the first `limit` pairs of TRL's prepared `dataset`, under the trainer's current model.

    None under DeepSpeed / FSDP: a plain forward outside the engine would not see sharded weights.
    """
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return None
    model, rows = trainer.model, [dataset[i] for i in range(min(limit, len(dataset)))]
    training, size = model.training, trainer.args.per_device_train_batch_size
    model.eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(rows), size):
            batch = trainer.data_collator(rows[start:start + size])
            ids = batch["input_ids"].to(trainer.args.device)  # (2B, T)
            mask = batch["completion_mask"].to(trainer.args.device)
            out = model(input_ids=ids, attention_mask=batch["attention_mask"].to(ids.device),
                        labels=ids.masked_fill(mask == 0, -100), fused_lm_head=True, use_cache=False)
            c, r = out.log_probs.sum(dim=1).float().chunk(2)  # (B,), (B,): zero off the mask
            chosen += c.tolist()
            rejected += r.tolist()
    model.train(training)
    return {"chosen": sum(chosen) / len(chosen), "rejected": sum(rejected) / len(rejected)}
