"""transformers' Trainer with the distillation loss: the student's hidden states against live
teachers or the teacher cache, through the fused loss (alignloop/kernels/distill_loss.py).

Usable from a script as well as from the stage:

    trainer = DistillTrainer(model=student, args=TrainingArguments(..., remove_unused_columns=False),
                             train_dataset=Rows(examples), data_collator=Collator(pad_id),
                             teachers=[LiveTeacher(teacher_model, 1.0)], loss=LossSettings())
    trainer.train()

The loss of a batch is the sum over its scored tokens divided by the scored tokens of the whole
accumulated batch (transformers' `num_items_in_batch`), so that gradient accumulation gives the
gradient of one large batch. The KD and CE terms are logged per token beside the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from alignloop.distill.cache import TeacherCache
from alignloop.distill.teachers import head_weight, student_hidden, teacher_hidden
from alignloop.kernels.distill_loss import Teacher, TeacherHead, linear_distill_loss
from alignloop.kernels.distill_reference import TopK, reference_distill_loss


@dataclass
class LossSettings:
    """The loss's settings (the `distill` section's keys of the same names)."""

    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.0
    top_k: int | None = None
    fused: bool = True  # false: the naive reference on full logits
    kernel: str = "auto"  # torch, triton, or auto: triton on a CUDA device


@dataclass
class LiveTeacher:
    model: torch.nn.Module
    weight: float = 1.0


@dataclass
class CachedTeacher:
    cache: TeacherCache
    weight: float = 1.0


class DistillTrainer(Trainer):
    """A Trainer whose loss is `sum_j w_j T^2 D_j + alpha CE` per scored token (docs/pruning.md)."""

    def __init__(self, *args, teachers: list[LiveTeacher | CachedTeacher], loss: LossSettings,
                 aux_loss_coef: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.teachers, self.settings = teachers, loss
        self.aux_loss_coef = aux_loss_coef  # an MoE student: coef x the router's balancing loss
        for teacher in teachers:
            if isinstance(teacher, LiveTeacher):
                teacher.model.to(self.args.device)
        self._sums = self._zero()

    def _zero(self) -> dict:
        return {"kd": torch.zeros(len(self.teachers)), "ce": 0.0, "tokens": 0, "aux": []}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        examples = inputs.pop("example", None)
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        unwrapped = self.accelerator.unwrap_model(model)
        routers = [] if self.aux_loss_coef else None
        hidden = student_hidden(model, ids, mask, unwrapped, routers)[:, :-1]  # (B, L - 1, H)
        targets = labels[:, 1:]  # (B, L - 1): the token each position predicts
        weight = head_weight(unwrapped)
        terms = self._terms(hidden, weight, targets, ids, mask, examples)
        # num_items_in_batch: the scored tokens of the whole accumulated batch (all processes)
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        count = num_items_in_batch if num_items_in_batch is not None else terms.count.clamp(min=1)
        loss = terms.loss / count
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # DDP averages the gradients
        if routers:  # a per-micro-batch mean, as TRL's SFT adds it (docs/moe.md)
            from alignloop.models.moe_load import aux_loss

            student = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
            aux = aux_loss(routers[-1], student.config.get_text_config(), mask)
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.aux_loss_coef * aux / steps
            self._sums["aux"].append(aux.item())
        self._sums["kd"] += terms.kd.detach().float().cpu()
        self._sums["ce"] += terms.ce.item()
        self._sums["tokens"] += int(terms.count)
        return (loss, {"kd": terms.kd, "ce": terms.ce}) if return_outputs else loss

    def _terms(self, hidden, weight, targets, ids, mask, examples):
        s = self.settings
        teachers = [Teacher(self._targets(t, ids, mask, examples, weight.device, s.fused), t.weight)
                    for t in self.teachers]
        kwargs = dict(loss=s.loss, beta=s.beta, temperature=s.temperature, alpha=s.alpha, top_k=s.top_k)
        if not s.fused:
            naive = [(t.targets, t.weight) for t in teachers]
            return reference_distill_loss(hidden, weight, targets, naive, **kwargs)
        backend = s.kernel if s.kernel != "auto" else ("triton" if weight.is_cuda else "torch")
        return linear_distill_loss(hidden, weight, targets, teachers, backend=backend, **kwargs)

    def _targets(self, teacher, ids, mask, examples, device, fused: bool):
        if isinstance(teacher, CachedTeacher):
            if examples is None:
                raise ValueError("cached teachers need each example's index: use distill.data.Collator")
            rows = teacher.cache.rows(examples.tolist())
            return TopK(rows.log_probs.to(device), rows.indices.to(device), rows.tail.to(device))
        hidden = teacher_hidden(teacher.model, ids, mask)[:, :-1]  # (B, L - 1, Ht)
        if not fused:  # the reference takes full teacher logits
            return hidden @ head_weight(teacher.model).t()
        return TeacherHead(hidden, head_weight(teacher.model))

    def log(self, logs: dict, *args, **kwargs) -> None:
        """Adds the KD and CE terms per scored token since the last log (this process's)."""
        tokens = self._sums["tokens"]
        if tokens and "loss" in logs:
            kd = self._sums["kd"] / tokens
            weights = torch.tensor([t.weight for t in self.teachers])
            logs["kd"] = round(float((weights * kd).sum()), 4)
            if len(self.teachers) > 1:
                logs.update({f"kd_{j}": round(float(v), 4) for j, v in enumerate(kd)})
            logs["ce"] = round(self._sums["ce"] / tokens, 4)
            if self._sums["aux"]:
                logs["aux_loss"] = round(sum(self._sums["aux"]) / len(self._sums["aux"]), 4)
            self._sums = self._zero()
        super().log(logs, *args, **kwargs)
