"""The `distill` recipe section (docs/pruning.md, "Distillation"). Light imports only."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from alignloop.data.source_config import SourceConfig
from alignloop.options import LoraOptions, Strict, TrainerSection


class TeacherConfig(Strict):
    """One teacher: a checkpoint (local directory, hub id, .gguf, adapter or builtin:tiny) and
    its weight. Weights are normalised to sum 1: the KD term is sum_j (w_j / sum w) T^2 D_j."""

    path: str
    weight: float = Field(default=1.0, gt=0)


class TeacherCorrection(Strict):
    """Minitron's teacher correction (arXiv 2408.11796, section 2): a short fine-tune of each
    teacher with the plain next-token loss on the distillation data before it teaches, so that
    its distribution matches the data the student sees."""

    steps: int = Field(default=100, gt=0)
    learning_rate: float = Field(default=1e-5, gt=0)
    batch_size: int = Field(default=8, gt=0)


class DistillConfig(TrainerSection):
    """A student learns from teachers' logits: our keys below; any other key is a transformers
    TrainingArguments option (learning_rate, max_steps, per_device_train_batch_size, ...)."""

    data: list[SourceConfig] = Field(default_factory=list)
    # What the records are: chat (rendered with the chat template; the loss on assistant tokens)
    # or document (plain text {"text": ...}; the loss on every token, long texts cut into
    # consecutive windows of max_length tokens).
    kind: Literal["chat", "document"] = "chat"
    max_length: int = Field(default=1024, ge=2)  # tokens per example; chat examples are truncated
    # The teachers; none: the recipe's model (the unpruned checkpoint a prune stage started from).
    teachers: list[TeacherConfig] = Field(default_factory=list)
    # The divergence (alignloop/kernels/distill_reference.py): forward_kl KL(teacher || student)
    # as Minitron and torchtune; reverse_kl KL(student || teacher); jsd GKD's generalised
    # Jensen-Shannon with `beta` (0 < beta < 1, the teacher's share of the mixture; read by jsd
    # only, since a resolved recipe writes every key back).
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    beta: float = Field(default=0.5, gt=0, lt=1)
    temperature: float = Field(default=1.0, gt=0)  # both distributions at T; the KD term x T^2
    alpha: float = Field(default=0.0, ge=0)  # + alpha x cross-entropy on the labels (at T = 1)
    # Compare distributions over the teacher's top k tokens plus one tail bucket instead of the
    # whole vocabulary (needed for the cache; 64 keeps ~all of a trained model's mass). None: all.
    top_k: int | None = Field(default=None, gt=0)
    # Precompute each teacher's top-k targets once into sharded files (alignloop/distill/cache.py)
    # and train from them, with no teacher in memory while training. `cache_dir`: where (a
    # subdirectory per cache key, reusable across runs); default: the stage's work directory.
    cache: bool = False
    cache_dir: str | None = None
    cache_shard_examples: int = Field(default=256, gt=0)  # examples per cache file
    teacher_correction: TeacherCorrection | None = None
    method: Literal["full", "lora"] = "full"  # the student: every weight, or LoRA adapters
    lora: LoraOptions | None = None
    merge: bool = False  # with method lora: also save the adapter merged into the student
    # false: the naive loss on full (tokens x vocab) logits, the reference (for comparisons)
    fused_loss: bool = True
    kernel: Literal["auto", "torch", "triton"] = "auto"  # auto: Triton on a CUDA GPU

    def problems(self) -> list[tuple[str, str]]:
        problems = super().problems()
        if self.cache and self.top_k is None:
            problems.append(("cache", "the teacher cache stores top-k targets: set distill.top_k "
                                      "(e.g. 64)"))
        if self.cache_dir is not None and not self.cache:
            problems.append(("cache_dir", "only used with cache: true"))
        return problems
