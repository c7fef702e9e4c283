"""Option blocks shared by several recipe sections (LoRA, quantization, scoring, trainer sections).

Only pydantic and the standard library here: `alignloop.config` and every stage's `config.py`
import this module, and validating a recipe must stay fast.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator


class SectionProblems(ValueError):
    """What a section's validator raises: one (key within the section, message) per problem.

    pydantic's `loc` of a model validator's error stops at the section; the recipe loader
    (alignloop.recipe_source) appends these keys to it, so that each message still names
    `file:line: section.key`. Outside a recipe the text reads `key: message; ...`.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{key}: {message}" for key, message in problems))


def raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise SectionProblems(problems)


class Strict(BaseModel):
    """A recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraOptions(Strict):
    r: int = Field(default=16, gt=0)
    alpha: float = Field(default=32, gt=0)
    # On an MoE checkpoint with expert or router LoRA, 0 unless set (peft's target_parameters
    # have no dropout; setting it then is an error).
    dropout: float = Field(default=0.05, ge=0, lt=1)
    # nn.Linear names, or "all-linear" (on an MoE checkpoint: every decoder nn.Linear but the
    # routers'). An entry that matches no module stops the stage (alignloop.models.moe).
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None
    # Mixture-of-Experts checkpoints (docs/moe.md); no effect on dense ones.
    experts: bool = True  # a LoRA per routed expert on gate_up_proj and down_proj
    router: Literal["frozen", "lora", "full"] = "frozen"  # the routers: frozen, LoRA, or trained in full
    # Who computes the routed experts' LoRA: alignloop's x.A.B per expert (no copy of the
    # experts; alignloop.kernels.moe_lora), or peft's W + B.A. Llama 4's experts: always peft.
    experts_kernel: Literal["alignloop", "peft"] = "alignloop"


class MoeOptions(Strict):
    """The `moe` section: Mixture-of-Experts training in every stage that trains (sft, reward,
    dpo, distill), ignored for dense checkpoints (docs/moe.md)."""

    # Weight of the router's load-balancing loss (Switch Transformer) added to the training loss.
    # None: the checkpoint's router_aux_loss_coef; 0: off. A stage's TRL option
    # router_aux_loss_coef, when set, wins for that stage.
    aux_loss_coef: float | None = Field(default=None, ge=0)
    # Per-expert share of the routed tokens per layer, and its coefficient of variation, logged
    # during training and written to the stage's metrics (and the report).
    load_telemetry: bool = True


class QuantizationOptions(Strict):
    """bitsandbytes quantization of the frozen base for QLoRA."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class TrainerSection(BaseModel):
    """A training stage's section: alignloop's keys (declared by subclasses) plus any key of the
    stage's TRL config (SFTConfig, RewardConfig, DPOConfig), passed through and type-checked by
    `alignloop.training.check_trainer_options`.

    The section's own rules are `problems()`, which subclasses extend; the validator raises them
    all at once.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    keep_checkpoints: bool = False  # keep <run>/.work/<round>/<stage>/checkpoints after completion
    # Recompute each layer's forward in the backward instead of keeping its activations. "auto":
    # on only when the activations would not fit comfortably (alignloop.models.memory); TRL's own
    # default is always on. `gradient_checkpointing` is accepted as the old name.
    activation_checkpointing: Literal["auto"] | bool = "auto"
    # Average the weights of the last N saved checkpoints (the final weights included) into the
    # stage's model: a cheap form of Llama 3's model averaging (reference A1, §4.1.5). None: off.
    average_checkpoints: int | None = Field(default=None, ge=2)

    @property
    def trainer_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _rules(self) -> "TrainerSection":
        raise_problems(self.problems())
        return self

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for each rule this section breaks: here, the keys that only go with
        some training `method` (a section without `method` has none of them)."""
        declared = type(self).model_fields
        method = self.method if "method" in declared else None
        problems = []
        if method == "full":
            problems += [(key, "only used when method is lora or qlora (it is 'full')")
                         for key in ("lora", "quantization")
                         if key in declared and getattr(self, key) is not None]
            if "merge" in declared and self.merge:
                problems.append(("merge", "merging needs method lora or qlora"))
        if method == "lora" and "quantization" in declared and self.quantization is not None:
            problems.append(("quantization", "quantization is for method: qlora"))
        return problems


class ScoringConfig(Strict):
    """How a response is scored: a weighted sum of the reward model's score and verifier scores.

    `reward_model`: weight of the learned reward model's score (0 = not used).
    `verifiers`: verifier name -> weight; names come from `alignloop.reward.verifiers.VERIFIERS`,
    or `package.module:function` for a user's own. A verifier returns a score in [0, 1].
    """

    reward_model: float = Field(default=1.0, ge=0)
    verifiers: dict[str, float] = Field(default_factory=dict)


def check_type(annotation: Any, value: Any) -> str | None:
    """None when `value` fits the type annotation, else pydantic's reason with the value."""
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError as err:
        return f"{err.errors()[0]['msg']} (got {value!r})"
    except Exception:  # an annotation pydantic cannot build a validator for: the TRL config decides
        return None
    return None
