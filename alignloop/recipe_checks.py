"""The checks of a recipe that need more than one section, run after its schema: what each
stage needs from the other sections and from the stages list (text loop and vision), what this
machine has (CUDA, bf16, packages), what the file system and the registries (builtin datasets,
verifiers) hold, and whether TRL / transformers accept the trainer options.

A section's own rules are validators on its class (`problems()` in alignloop/*/config.py).
`cfg` is an alignloop.config.Recipe, which imports this module; `where` formats a problem as
`file:line: key: message` (alignloop.recipe_source.Where).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alignloop import hardware
from alignloop.training import (DISTILL, PLAIN_STAGES, TRAINING_STAGES, VISION, arguments_class,
                                check_trainer_options, training_arguments, trl_config)
from alignloop.vision.config import TRAINING_STAGES as VISION_TRAINING_STAGES

_LOCAL = ("/", "./", "../", "~")  # a value that names a local path rather than a hub id


def check_recipe(cfg, where, *, trainer: bool = True) -> list[str]:
    """Every problem found, one `where` line each. `trainer=False` leaves out the trainer
    options (checking them imports trl, about 10 s)."""
    problems = _loop(cfg, where) + _precision(cfg, where) + _packages(cfg, where)
    problems += _builtins(cfg, where) + _verifiers(cfg, where)
    if cfg.vision is not None:
        problems += _vision_needs(cfg.vision, where) + _vision_files(cfg.vision, where)
        problems += _vision_generation(cfg, where)
    problems += _attention(cfg, where) + _generation(cfg, where) + _moe(cfg, where)
    if trainer:
        problems += _trainer_options(cfg, where)
        if not problems:
            problems += _construct(cfg, where)
    return problems


def _trained(cfg) -> list[str]:
    return [s for s in (DISTILL, *TRAINING_STAGES) if s in cfg.all_stages]


# ---------------------------------------------------------------------------------------------
# What a stage needs from the other sections and the stages list


def _loop(cfg, where) -> list[str]:
    """What each stage of the text loop needs from the recipe or the stages before it in a round."""
    problems, stages, rs = [], cfg.stages, cfg.rejection_sampling
    if "sft" in stages and not cfg.sft.data and "rejection_sampling" not in stages \
            and "synth_data" not in stages:
        problems.append(where("sft.data", "the sft stage needs at least one data source"))
    initial = cfg.initial_sft_section
    if initial is not None and not initial.data:
        key = "initial_sft" if cfg.initial_sft is True else "initial_sft.data"
        problems.append(where(key, "round 0's SFT has no data: set sft.data, or data under initial_sft"))
    if "reward" in stages and not cfg.reward.data and not (cfg.reward.round_pairs and cfg.rounds > 1
                                                              and "rejection_sampling" in stages):
        problems.append(where("reward.data", "the reward stage needs preference data: reward.data, "
                                             "or earlier rounds' rejection-sampling pairs"))
    has_reward = "reward" in stages or rs.reward_model is not None
    reward = ("reward model", "a reward stage in the round or rejection_sampling.reward_model")
    if "rejection_sampling" in stages:
        problems += _sampling(rs, "rejection_sampling", "prompts", has_reward, reward, where)
    if "synth_data" in stages:
        if not (cfg.synth_data.documents or cfg.synth_data.prompts):
            problems.append(where("synth_data", "synthetic data needs seed documents or prompts"))
        problems += _reward_weight(cfg.synth_data.scoring, "synth_data", has_reward, reward, where)
    if "dpo" in stages and not cfg.dpo.data and not ("rejection_sampling" in stages and rs.pairs) \
            and not (cfg.safety and cfg.safety.dpo_ratio > 0 and cfg.safety.data):
        problems.append(where("dpo.data", "the dpo stage needs preference pairs: dpo.data, or "
                                          "rejection_sampling with pairs in the same round"))
    if "distill" in stages and not cfg.distill.data:
        problems.append(where("distill.data", "the distill stage needs text or chat records for the "
                                              "student to learn the teachers' logits on"))
    return problems + _prune(cfg, where) + _safety_and_evaluation(cfg, where)


def _prune(cfg, where) -> list[str]:
    """What the prune stage needs when `stages` lists it: calibration records for activation
    importance, and a target. (The target's own rules are PruneTarget's; those that need the
    model's config are checked when the stage starts.)"""
    if "prune" not in cfg.stages:
        return []
    section, problems = cfg.prune, []
    if section.importance == "activation" and not section.data:
        problems.append(where("prune.data", "importance 'activation' needs calibration records; "
                                            "add a data source or set prune.importance: magnitude "
                                            "or random"))
    if not section.target.given() and section.target.params is None and section.tie_embeddings is None:
        problems.append(where("prune.target", "nothing to prune: give a shape (num_hidden_layers, "
                                              "hidden_size, num_attention_heads, head_dim, "
                                              "intermediate_size) or a parameter budget (params)"))
    return problems


def _sampling(rs, key: str, records: str, has_reward: bool, reward: tuple[str, str], where) -> list[str]:
    """What rejection sampling, text or vision, needs: prompt records, and a reward model when
    the reward model's score has a weight. (What the section needs of itself, such as enough
    samples per prompt, is RejectionSamplingConfig's.)"""
    problems = [] if rs.prompts else [where(f"{key}.prompts", f"rejection sampling needs {records}")]
    return problems + _reward_weight(rs.scoring, key, has_reward, reward, where)


def _reward_weight(scoring, key: str, has_reward: bool, reward: tuple[str, str], where) -> list[str]:
    """`reward`: (which model, what provides one)."""
    if scoring.reward_model > 0 and not has_reward:
        return [where(f"{key}.scoring.reward_model", f"weight {scoring.reward_model:g} but no {reward[0]}: "
                                                     f"scoring with it needs {reward[1]}; or set the "
                                                     "weight to 0")]
    return []


def _safety_and_evaluation(cfg, where) -> list[str]:
    problems, safety, ev = [], cfg.safety, cfg.evaluation
    if safety is not None and not safety.data and not safety.eval_data:
        problems.append(where("safety.data", "the safety section needs data or eval_data"))
    if safety is not None and safety.classifier == "llama_guard" and not safety.llama_guard:
        problems.append(where("safety.llama_guard", "classifier: llama_guard needs the path of a "
                                                    "Llama Guard 3 checkpoint"))
    if ev is not None:
        if ev.task is None and not ev.safety and not ev.reward:
            problems.append(where("evaluation", "nothing to evaluate: set task (with data), safety or reward"))
        if ev.task is not None and not ev.data:
            problems.append(where("evaluation.data", "task accuracy needs prompts with answers"))
        if ev.safety and (safety is None or not safety.eval_data):
            problems.append(where("evaluation.safety", "needs safety.eval_data (held-out "
                                                       "adversarial and borderline prompts)"))
    return problems


def _vision_needs(vision, where) -> list[str]:
    """What each vision stage needs from the vision section's other keys and its stages list."""
    problems, rs = [], vision.rejection_sampling
    for stage in (s for s in VISION_TRAINING_STAGES if s in vision.stages):
        fed = vision.after_rejection_sampling(stage) and (stage == "sft" or (stage == "dpo" and rs.pairs))
        if not getattr(vision, stage).data and not fed:
            problems.append(where(f"vision.{stage}.data", f"the vision {stage} stage needs at least "
                                                          "one data source"))
    if "rejection_sampling" in vision.stages:
        records = "vision_prompt records (an image and a question; an `answer` feeds verifiers)"
        reward = ("vision reward model", "reward before rejection_sampling in vision.stages, or "
                  "vision.rejection_sampling.reward_model: a vision_reward stage's model/ directory")
        has_reward = "reward" in vision.stages or rs.reward_model is not None
        problems += _sampling(rs, "vision.rejection_sampling", records, has_reward, reward, where)
    if vision.after_rejection_sampling("sft") and vision.sft.kind != "vision_chat":
        problems.append(where("vision.sft.kind", "an sft after rejection_sampling trains on its "
                                                 "vision_chat samples; set kind: vision_chat"))
    if vision.evaluation is not None and not vision.evaluation.data:
        problems.append(where("vision.evaluation.data", "answer accuracy needs prompts with answers"))
    return problems


def _vision_generation(cfg, where) -> list[str]:
    """Vision rejection sampling samples with transformers only: vLLM dropped Mllama after
    0.10.2 (docs/vision.md, "No vLLM for vision")."""
    backend = cfg.generation.backend
    if "rejection_sampling" not in cfg.vision.stages or backend == "hf":
        return []
    return [where("generation.backend", f"{backend}: vision rejection sampling samples with "
                                        "transformers only (vLLM runs Mllama only up to v0.10.2, "
                                        "docs/vision.md); set backend: hf")]


# ---------------------------------------------------------------------------------------------
# The machine, the file system and the registries


def _precision(cfg, where) -> list[str]:
    problems = []
    for stage in _trained(cfg) or ["sft"]:
        options = getattr(cfg, stage).trainer_options
        wants_bf16 = cfg.precision == "bf16" or options.get("bf16") is True
        wants_fp16 = cfg.precision == "fp16" or options.get("fp16") is True
        key = ("precision" if cfg.precision in ("bf16", "fp16")
               else f"{stage}.bf16" if wants_bf16 else f"{stage}.fp16")
        if wants_bf16 and wants_fp16:
            problems.append(where(key, "bf16 and fp16 are both on; choose one"))
        elif wants_bf16 and not hardware.bf16_supported():
            problems.append(where(key, "bf16 was asked for, but this machine has no CUDA GPU and its "
                                       "CPU has no native bfloat16 (AVX512-BF16/AMX); use precision: "
                                       "auto or fp32"))
        elif wants_fp16 and not hardware.cuda_available():
            problems.append(where(key, "fp16 mixed precision needs a CUDA GPU; use precision: auto or fp32"))
    return list(dict.fromkeys(problems))  # `precision: bf16` is one problem, not one per stage


def _packages(cfg, where) -> list[str]:
    """Packages the trained stages' settings need: bitsandbytes for qlora, trackers for report_to."""
    problems = []
    for stage in _trained(cfg):
        section = getattr(cfg, stage)
        if section.method == "qlora" and not hardware.has_module("bitsandbytes"):
            problems.append(where(f"{stage}.method", "qlora needs bitsandbytes, which is not installed "
                                                     "(pip install bitsandbytes), or use method: lora"))
        report_to = section.trainer_options.get("report_to")
        for name in [report_to] if isinstance(report_to, str) else (report_to or []):
            module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
            if module and not hardware.has_module(module):
                problems.append(where(f"{stage}.report_to", f"'{name}' needs the {module} package "
                                                            f"(pip install 'alignloop[tracking]')"))
    return problems


def _builtins(cfg, where) -> list[str]:
    from alignloop.data.tasks import BUILTIN

    return [where(f"{key}.{i}.builtin", f"unknown builtin dataset '{src.builtin}' "
                                        f"(known: {', '.join(sorted(BUILTIN))})")
            for key, sources in cfg.source_lists().items() for i, src in enumerate(sources)
            if src.builtin is not None and src.builtin not in BUILTIN]


def _verifiers(cfg, where) -> list[str]:
    from alignloop.reward.verifiers import VERIFIERS

    names = {f"rejection_sampling.scoring.verifiers.{n}": n for n in cfg.rejection_sampling.scoring.verifiers}
    names.update({f"synth_data.scoring.verifiers.{n}": n for n in cfg.synth_data.scoring.verifiers})
    if cfg.evaluation is not None and cfg.evaluation.task is not None:
        names["evaluation.task"] = cfg.evaluation.task
    return [where(key, f"unknown verifier '{name}' (known: {', '.join(sorted(VERIFIERS))}; or "
                       "package.module:function)")
            for key, name in names.items() if name not in VERIFIERS and ":" not in name]


def _vision_files(vision, where) -> list[str]:
    """The vision evaluation's verifier, and the checkpoints the vision section names."""
    from alignloop.reward.verifiers import resolve_verifier

    problems, rs = [], vision.rejection_sampling
    if vision.evaluation is not None:
        try:
            resolve_verifier(vision.evaluation.task)
        except ValueError as err:
            problems.append(where("vision.evaluation.task", str(err)))
    rm = vision.reward.text_reward_model
    if rm is not None and rm.startswith(_LOCAL) and not Path(rm).expanduser().exists():
        problems.append(where("vision.reward.text_reward_model", f"no such directory: {rm}"))
    rm = rs.reward_model
    if "rejection_sampling" in vision.stages and rm is not None and not Path(rm).expanduser().is_dir():
        problems.append(where("vision.rejection_sampling.reward_model", f"no such directory: {rm}"))
    encoder = vision.llama3v.encoder
    if vision.architecture == "llama3v" and encoder.startswith(_LOCAL) \
            and not Path(encoder).expanduser().exists():
        problems.append(where("vision.llama3v.encoder", f"no such directory: {encoder}"))
    return problems


def _attention(cfg, where) -> list[str]:
    """Packed or padding-free SFT batches need attention that keeps documents apart
    (docs/long_context.md)."""
    problems = []
    sections = [("sft", cfg.sft)] + ([("initial_sft", cfg.initial_sft)]
                                     if not isinstance(cfg.initial_sft, bool) else [])
    for name, sft in sections:
        packed = [k for k in ("packing", "padding_free") if sft.trainer_options.get(k) is True]
        if packed and cfg.model.attn_implementation == "flex_attention":
            problems.append(where(f"{name}.{packed[0]}", "packed / padding-free batches need "
                                  "attention that separates documents by position_ids; "
                                  "flex_attention attends across them: use sdpa, eager or "
                                  "alignloop_triton, or turn packing off"))
    return problems


def _moe(cfg, where) -> list[str]:
    """`moe.aux_loss_coef` is every stage's load-balancing coefficient; a stage's TRL option
    router_aux_loss_coef beside it would be a second, contradicting value (docs/moe.md)."""
    if cfg.moe.aux_loss_coef is None:
        return []
    sections = [("sft", cfg.sft), ("dpo", cfg.dpo)]
    if not isinstance(cfg.initial_sft, bool):
        sections.append(("initial_sft", cfg.initial_sft))
    return [where(f"{name}.router_aux_loss_coef", "moe.aux_loss_coef already sets the "
                                                  "load-balancing coefficient of every stage; "
                                                  "keep one of the two")
            for name, section in sections if "router_aux_loss_coef" in section.trainer_options]


def _generation(cfg, where) -> list[str]:
    samples = any(s in cfg.stages for s in ("rejection_sampling", "synth_data"))
    if "generation" not in cfg.model_fields_set and not samples:
        return []
    gen = cfg.generation
    if gen.backend == "vllm" and not hardware.has_module("vllm"):
        return [where("generation.backend", "backend vllm needs vLLM in this Python environment "
                                            "(pip install 'alignloop[vllm]'), or use vllm_server "
                                            "with server_python / server_url, or hf")]
    if gen.backend == "vllm_server" and not (gen.server_url or gen.server_python):
        return [where("generation.backend", "vllm_server needs server_url (a running endpoint) or "
                                            "server_python (a Python with vLLM, to start one)")]
    return []


# ---------------------------------------------------------------------------------------------
# Trainer options: passed through to TRL's configs and transformers' TrainingArguments


def _trainer_sections(cfg) -> list[tuple[str, str, object]]:
    """(key, stage, section) of every section with trainer options, run or not: a typo is a typo."""
    sections = [(stage, stage, getattr(cfg, stage)) for stage in (DISTILL, *TRAINING_STAGES)]
    if not isinstance(cfg.initial_sft, bool):
        sections.append(("initial_sft", "sft", cfg.initial_sft))
    if cfg.vision is not None:
        sections += [(f"vision.{stage}", VISION, getattr(cfg.vision, stage))
                     for stage in VISION_TRAINING_STAGES]
    return sections


def _trainer_options(cfg, where) -> list[str]:
    return [where(f"{key}.{option}", problem) for key, stage, section in _trainer_sections(cfg)
            if section.trainer_options for option, problem in check_trainer_options(section, stage)]


def _construct(cfg, where) -> list[str]:
    """Builds each trainer's arguments once, so that what TRL or transformers reject fails now."""
    scratch = Path(tempfile.gettempdir()) / "alignloop-validate"
    precision = hardware.resolve_precision(cfg.precision)
    runs = [(stage, stage, getattr(cfg, stage)) for stage in _trained(cfg)]
    if not isinstance(cfg.initial_sft, bool):
        runs.append(("initial_sft", "sft", cfg.initial_sft_section))
    if cfg.vision is not None:
        runs += [(f"vision.{stage}", VISION, getattr(cfg.vision, stage))
                 for stage in VISION_TRAINING_STAGES if stage in cfg.vision.stages]
    problems = []
    for key, stage, section in runs:
        try:
            if stage in PLAIN_STAGES:
                training_arguments(section, seed=cfg.seed, precision=precision, output_dir=scratch)
            else:
                trl_config(stage, section, seed=cfg.seed, precision=precision, output_dir=scratch)
        except Exception as err:  # TRL / transformers validation: its message is the useful part
            problems.append(where(key, f"{arguments_class(stage).__name__} rejected these options: {err}"))
    return problems
