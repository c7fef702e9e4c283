"""What the training stages share: their trainer arguments, built on one set of defaults (TRL's
configs for sft, reward and dpo; transformers' TrainingArguments for the vision stages and
distill), the check of the options a recipe passes through to them, the TensorBoard log
directory, the saved model directory, and what a Mixture-of-Experts checkpoint adds (the aux
loss coefficient, the LoRA coverage audit, the expert-LoRA kernel, load telemetry).

The builders take what they use (a section, the seed, the resolved precision, an output
directory, the checkpoint), not the whole recipe; this module does not import alignloop.config,
which imports it to check and build what a recipe asks for before anything runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import os
from pathlib import Path
from typing import Any

from alignloop import hardware
from alignloop.options import check_type

logger = logging.getLogger("alignloop.training")

TRAINING_STAGES = ("reward", "sft", "dpo")  # the text stages on a TRL trainer
VISION = "vision"  # the arguments of the vision stages: transformers' TrainingArguments
DISTILL = "distill"  # the distill stage: transformers' Trainer and TrainingArguments too
PLAIN_STAGES = (VISION, DISTILL)  # stages whose arguments are TrainingArguments (training_arguments)

# Keys alignloop sets itself; a recipe sets them through our own keys instead.
_OUR_LOSS = "the loss is always on assistant tokens only (our masks)"
_MANAGED = {"output_dir": "set the top-level output_dir"}
MANAGED = {
    "text": {**_MANAGED, "assistant_only_loss": _OUR_LOSS, "completion_only_loss": _OUR_LOSS,
             "dataset_text_field": "data comes through sft.data as chat records"},
    VISION: {**_MANAGED, "remove_unused_columns": "vision batches are built by alignloop's collator"},
    DISTILL: {**_MANAGED, "remove_unused_columns": "distillation batches are built by alignloop's "
                                                   "collator (they carry the teacher-cache index)"},
}


def arguments_class(stage: str):
    """SFTConfig, RewardConfig or DPOConfig for a text stage; TrainingArguments for PLAIN_STAGES."""
    if stage in PLAIN_STAGES:
        from transformers import TrainingArguments

        return TrainingArguments
    from trl import DPOConfig, RewardConfig, SFTConfig

    return {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig}[stage]


def argument_fields(stage: str) -> dict[str, dataclasses.Field]:
    """The fields a recipe may pass through to the stage's arguments class."""
    return {f.name: f for f in dataclasses.fields(arguments_class(stage)) if f.init}


def check_trainer_options(section, stage: str) -> list[tuple[str, str]]:
    """(option, problem) for each pass-through option of `section` (a TrainerSection) that
    alignloop sets itself, that is no field of the stage's arguments class (with the nearest of
    its fields and ours), or whose value has the wrong type. `stage`: sft, reward, dpo, VISION or
    DISTILL."""
    fields, cls = argument_fields(stage), arguments_class(stage)
    managed = MANAGED[stage if stage in PLAIN_STAGES else "text"]
    problems = []
    for key, value in section.trainer_options.items():
        if key in managed:
            problems.append((key, f"not settable here: {managed[key]}"))
        elif key not in fields:
            hint = difflib.get_close_matches(key, [*fields, *type(section).model_fields], n=1)
            problems.append((key, "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
                             + f"; not an alignloop key nor a {cls.__name__} field"))
        else:
            problem = check_type(fields[key].type, value)
            if problem:
                problems.append((key, problem))
    return problems


def _defaults(seed: int, precision: str) -> dict[str, Any]:
    """Every trainer's defaults: CPU-safe, no tracking, a checkpoint every 200 steps.
    `precision`: resolved (hardware.resolve_precision)."""
    return {"seed": seed, "logging_steps": 10, "save_strategy": "steps", "save_steps": 200,
            "save_total_limit": 2, "report_to": "none", "bf16": precision == "bf16",
            "fp16": precision == "fp16", "use_cpu": not hardware.cuda_available(),
            "dataloader_num_workers": 0, "disable_tqdm": False}


def trl_config(stage: str, section, *, seed: int, precision: str, output_dir: Path,
               model_path: str | None = None):
    """The text stage's TRL config: our defaults, then the section's options, then what we manage.

    `precision`: resolved (hardware.resolve_precision). `model_path`: the checkpoint the stage
    trains, which `activation_checkpointing: auto` sizes its activations from (without it, as
    when a recipe is validated, auto means on).
    """
    options = {**_defaults(seed, precision), **section.trainer_options}
    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing; the old name
    # is still accepted in recipes.
    checkpointing = options.pop("gradient_checkpointing", section.activation_checkpointing)
    if "activation_checkpointing" in section.model_fields_set:
        checkpointing = section.activation_checkpointing
    options["activation_checkpointing"] = checkpointing is not False
    options["output_dir"] = str(output_dir)
    if section.average_checkpoints and options.get("save_total_limit") is not None:
        # averaging reads the last average_checkpoints - 1 checkpoints: keep at least that many
        options["save_total_limit"] = max(options["save_total_limit"], section.average_checkpoints)
    if stage == "sft":
        options["max_length"] = section.max_length
    if stage == "dpo":
        options["learning_rate"] = section.learning_rate
        options.update(_dpo_options(section, options))
    args = arguments_class(stage)(**options)
    if checkpointing == "auto" and model_path is not None:
        args.activation_checkpointing = _needs_checkpointing(stage, section, args, model_path, precision)
    return args


def training_arguments(section, *, seed: int, precision: str, output_dir: Path):
    """TrainingArguments of a stage on transformers' Trainer (the vision stages, distill): the
    text stages' defaults, then the section's options."""
    options = {**_defaults(seed, precision), **section.trainer_options, "output_dir": str(output_dir),
               "remove_unused_columns": False}  # batches carry pixel_values, cache indices etc.
    return arguments_class(VISION)(**options)


def _needs_checkpointing(stage: str, section, args, model_path: str, precision: str) -> bool:
    """`activation_checkpointing: auto` for this stage's largest micro-batch (docs/recipes.md)."""
    from alignloop.kernels import fused_head
    from alignloop.models.memory import model_config, needs_checkpointing, parameter_count
    from alignloop.sft.config import SFTStageConfig

    config = model_config(model_path)
    if config is None:  # not a config we can read: as TRL does
        return True
    # no limit: sized for the default length
    max_length = args.max_length or SFTStageConfig.model_fields["max_length"].default
    sequences = args.per_device_train_batch_size * (2 if stage in ("reward", "dpo") else 1)
    dtype_bytes = 2 if precision in ("bf16", "fp16") else 4
    full = section.method == "full"
    params = parameter_count(config)
    # weights; a full fine-tune adds fp32 gradients and Adam's two moments
    weights = params * (dtype_bytes + (12 if full else 0))
    fused = stage != "reward" and fused_head.wanted(section.fused_loss, max_length,
                                                    config.get_text_config().vocab_size)
    return needs_checkpointing(config, sequences * max_length, dtype_bytes, lora=not full,
                               fused_head=fused, weights_bytes=weights)


def _dpo_options(section, options: dict[str, Any]) -> dict[str, Any]:
    """Llama 3's DPO (reference A5): the sigmoid loss plus an NLL term on the chosen response
    with weight `nll_weight` (TRL: loss_type ["sigmoid", "sft"]), and reference log-probs
    precomputed when that saves time."""
    out: dict[str, Any] = {}
    if "loss_type" not in options:
        if section.nll_weight > 0:
            out["loss_type"], out["loss_weights"] = ["sigmoid", "sft"], [1.0, section.nll_weight]
        else:
            out["loss_type"] = ["sigmoid"]
    precompute = section.precompute_ref_log_probs
    if precompute == "auto":
        # Once per example instead of once per epoch; and a full fine-tune then needs no second
        # copy of the model in memory during training. LoRA's reference is the adapter-free base.
        precompute = options.get("num_train_epochs", 3) > 1 or section.method == "full"
    out["precompute_ref_log_probs"] = precompute
    return out


@contextlib.contextmanager
def tensorboard_logs(log_dir: Path):
    """Points transformers' TensorBoard callback at `log_dir` (kept after the stage completes)."""
    if "TENSORBOARD_LOGGING_DIR" in os.environ:  # set by the user: theirs wins
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(log_dir)
    try:
        yield
    finally:
        del os.environ["TENSORBOARD_LOGGING_DIR"]


def save_trained(trainer, tokenizer, model_dir: Path) -> None:
    """The trained model into `model_dir`: safetensors (the adapter only, for LoRA), its
    tokenizer, and the training arguments as JSON instead of the pickle the trainer writes beside
    the weights. Every process calls it; only the main one writes."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(model_dir))  # writes on the main process only
    if trainer.is_world_process_zero():
        (model_dir / "training_args.bin").unlink(missing_ok=True)
        (model_dir / "training_args.json").write_text(trainer.args.to_json_string())
        tokenizer.save_pretrained(model_dir)


# ---------------------------------------------------------------------------------------------
# Mixture-of-Experts checkpoints (docs/moe.md)


def moe_aux_coef(model, moe, args=None) -> float | None:
    """The load-balancing loss coefficient a stage trains `model` with, None for a dense model.

    The stage's own TRL option (`sft.router_aux_loss_coef`, passed through into `args`) wins, then
    the recipe's `moe.aux_loss_coef`, then the checkpoint's `router_aux_loss_coef`; it is written
    into `args` (SFTConfig, DPOConfig), whose trainers add coef x aux to the loss and log
    `aux_loss`. Call before the trainer is built: it reads the coefficient in its constructor.
    """
    from alignloop.models.moe import moe_blocks, trl_ready

    if not moe_blocks(model):
        return None
    trl_ready(model)
    text = model.config.get_text_config()
    own = getattr(args, "router_aux_loss_coef", None)
    coef = own if own is not None else moe.aux_loss_coef
    coef = coef if coef is not None else getattr(text, "router_aux_loss_coef", 0.0)
    if args is not None and hasattr(args, "router_aux_loss_coef"):
        args.router_aux_loss_coef = coef
    return coef


@dataclasses.dataclass
class MoeRun:
    """What `prepare_moe` set up for one stage; `metrics(trainer)` reports it once trained."""

    coverage: list[dict] | None = None  # the LoRA audit (alignloop.models.moe.coverage)
    moe: bool = False
    coef: float | None = None
    kernel: str | None = None  # who computes the routed experts' LoRA: alignloop or peft
    load: Any = None  # alignloop.models.moe_load.RouterLoad

    def metrics(self, trainer) -> dict:
        """`lora_coverage`; for an MoE model also `moe` (architecture, coefficient, aux losses,
        expert kernel, per-layer load) and `load_cv` (the report's column). Removes the hooks."""
        out: dict[str, Any] = {}
        if self.coverage is not None:
            out["lora_coverage"] = self.coverage
        if not self.moe:
            return out
        from alignloop.models.moe_load import load_report

        history = trainer.state.log_history
        load = load_report(self.load.total()) if self.load is not None else None
        if self.load is not None:
            self.load.close()
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        out["moe"] = {"architecture": base.config.get_text_config().model_type,
                      "aux_loss_coef": self.coef, "experts_kernel": self.kernel,
                      "aux_losses": [round(e["aux_loss"], 4) for e in history if "aux_loss" in e],
                      "load_cv": [e["moe/load_cv"] for e in history if "moe/load_cv" in e],
                      "load": load}
        out["load_cv"] = load["mean_cv"] if load else None
        return out


def prepare_moe(trainer, lora, moe, *, key: str, where=None, coef: float | None = None) -> MoeRun:
    """After the trainer is built, before it trains. With LoRA (`lora`: the stage's LoraOptions,
    None for a full fine-tune): the coverage audit, logged, which raises LoraTargetError naming
    `key` (e.g. `sft.lora`) when routed experts asked for got no adapter or the router got one
    unasked. On an MoE model: routed-expert LoRA through alignloop's kernel (lora.experts_kernel;
    Llama 4 stays on peft's), and the per-expert load telemetry (`moe.load_telemetry`)."""
    from alignloop.models.moe import check_coverage, coverage, format_coverage, moe_blocks

    model, run = trainer.model, MoeRun(coef=coef)
    if lora is not None and hasattr(model, "peft_config"):
        run.coverage = coverage(model)
        logger.info("%s: LoRA coverage\n%s", key, format_coverage(run.coverage))
        check_coverage(run.coverage, lora, key, where)
    run.moe = bool(moe_blocks(model))
    if not run.moe:
        return run
    if lora is not None and lora.experts:
        from alignloop.kernels import moe_lora

        use = lora.experts_kernel == "alignloop" and moe_lora.install(model)
        run.kernel = "alignloop" if use else "peft"
        if lora.experts_kernel == "alignloop" and not use:
            logger.info("%s: this model's experts do not dispatch through transformers' experts "
                        "interface (Llama 4): their LoRA is computed by peft", key)
    if moe.load_telemetry:
        from alignloop.models.moe_load import LoadCallback, RouterLoad, experts_per_token

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        run.load = RouterLoad(model, experts_per_token(base.config.get_text_config())[1])
        trainer.callback_handler.callbacks.insert(0, LoadCallback(run.load))  # before the loggers
    return run
