"""TRL's RewardTrainer with, for a Mixture-of-Experts reward model, the router's load-balancing
loss (docs/moe.md): TRL 1.16 adds it in its SFT and DPO trainers but not in this one, and
transformers' sequence-classification heads do not return the router logits, so they are
caught at the backbone (alignloop.models.moe_load.caught_router_logits).

    loss = Bradley-Terry loss (TRL's, with its margin and centering terms) + coef * aux

`aux_loss` is logged beside TRL's metrics, as the SFT and DPO trainers log it.
"""

from __future__ import annotations

from trl import RewardTrainer

from alignloop.models.moe_load import aux_loss, caught_router_logits


class MoeRewardTrainer(RewardTrainer):
    """RewardTrainer; `aux_loss_coef`: None or 0 for TRL's loss unchanged."""

    def __init__(self, *args, aux_loss_coef: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_loss_coef = aux_loss_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.aux_loss_coef:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        unwrapped = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        with caught_router_logits(unwrapped) as caught:
            loss, outputs = super().compute_loss(model, {**inputs, "output_router_logits": True},
                                                 True, num_items_in_batch)
        aux = aux_loss(caught[-1], unwrapped.config.get_text_config(), inputs["attention_mask"])
        mode = "train" if self.model.training else "eval"
        logged = self.accelerator.gather_for_metrics(aux.detach()).mean().item()
        self._metrics[mode]["aux_loss"].append(logged)
        loss = loss + self.aux_loss_coef * aux
        return (loss, outputs) if return_outputs else loss
