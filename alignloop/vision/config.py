"""Typed configs for the Llama 3.2 Vision-style model and the recipe's `vision` section.

Only pydantic and the standard library here (validating a recipe must stay fast); the model
classes live in `alignloop.vision.model`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from alignloop.data.source_config import SourceConfig
from alignloop.options import LoraOptions, Strict, TrainerSection, raise_problems
from alignloop.rejection_sampling.config import RejectionSamplingConfig

# MllamaVisionConfig fields of the encoders we can build fresh. "llama3.2" is the released
# Llama 3.2 Vision encoder (reference C3: ViT-H/14, 32 + 8 gated global layers, features of
# layers 4/8/16/24/31 and the last, 7680 wide, tiles of 560 px); "tiny" is a CPU-sized one for
# tests and the shapes demo (one 32 px tile of 8 px patches).
ENCODERS: dict[str, dict[str, Any]] = {
    "llama3.2": dict(hidden_size=1280, num_hidden_layers=32, num_global_layers=8, attention_heads=16,
                     intermediate_size=5120, image_size=560, patch_size=14, max_num_tiles=4,
                     intermediate_layers_indices=[3, 7, 15, 23, 30], vision_output_dim=7680),
    "tiny": dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                 intermediate_size=64, image_size=32, patch_size=8, max_num_tiles=1,
                 supported_aspect_ratios=[[1, 1]], intermediate_layers_indices=[0, 1],
                 vision_output_dim=96),
}
LEARNABLE_ROWS = 8  # Meta's `learnable_embedding`: rows for ids >= the text vocabulary (reference C2)


def default_cross_layers(num_layers: int, every: int) -> list[int]:
    """Meta's schedule (reference C2): a cross layer before every `every`-th self layer, counted
    from the top, `llama_layers[::-1][::every][::-1]`: 3, 7, ..., 31 for 32 layers and every=4."""
    return list(range(num_layers - 1, -1, -every))[::-1]


class AdapterConfig(Strict):
    """How to attach a fresh adapter and encoder to a Llama text model (issue 4, item 3).

    `cross_attention_layers` are indices of *self*-attention layers; a gated cross-attention layer
    runs before each. None: one before every `cross_attention_every`-th layer (Meta's schedule).
    """

    cross_attention_layers: list[int] | None = None
    cross_attention_every: int = Field(default=4, gt=0)
    encoder: Literal["llama3.2", "tiny"] = "llama3.2"
    encoder_options: dict[str, Any] = Field(default_factory=dict)  # MllamaVisionConfig overrides
    # None: the tokenizer's <|image|> when it is a single token, else the first id after the text
    # vocabulary (128256 for Llama 3.x, as the released Llama 3.2 Vision).
    image_token_id: int | None = None
    seed: int = 0

    def encoder_fields(self) -> dict[str, Any]:
        return {**ENCODERS[self.encoder], **self.encoder_options}

    def cross_layers(self, num_layers: int) -> list[int]:
        layers = self.cross_attention_layers
        if layers is None:
            return default_cross_layers(num_layers, self.cross_attention_every)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"cross_attention_layers {layers}: each must be a distinct self-attention "
                             f"layer index in 0..{num_layers - 1}")
        return sorted(layers)


# SiglipVisionConfig fields of the Llama 3-V variant's tiny encoder (CPU tests and the demo):
# 32 px images of 8 px patches, P = 16 patch features per image.
LLAMA3V_TINY_ENCODER: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    image_size=32, patch_size=8, vision_use_head=False)
LLAMA3V_PARTS = ("projector", "encoder")
LLAMA3V_STAGES = ("adapter", "sft")


class Llama3VOptions(Strict):
    """The Llama 3-V variant (issue 4, item 6; alignloop.vision.llama3v): a SigLIP encoder's
    patch features, through a projector of `projector_layers` self-attention blocks, replace
    `image_tokens` image tokens of the text (default: one per patch; fewer average-pool the patch
    grid, so it must be a square).

    `encoder`: "tiny" (random, seeded by `seed`, `encoder_options` over LLAMA3V_TINY_ENCODER) or
    a SigLIP checkpoint (a local directory, or a hub id already in the local cache). With
    `cache_features` the frozen encoder's features are computed once per image into `cache_dir`
    (default `<output_dir>/feature_cache`) and training reads them from there.
    """

    encoder: str = "tiny"
    encoder_options: dict[str, Any] = Field(default_factory=dict)
    image_tokens: int | None = Field(default=None, gt=0)
    projector_layers: int = Field(default=2, ge=0)
    cache_features: bool = True
    cache_dir: str | None = None
    seed: int = 0

    def tiny_patches(self) -> int | None:
        """P of the tiny encoder (None for a checkpoint: known once it is loaded)."""
        if self.encoder != "tiny":
            return None
        fields = {**LLAMA3V_TINY_ENCODER, **self.encoder_options}
        return (int(fields["image_size"]) // int(fields["patch_size"])) ** 2


# ---------------------------------------------------------------------------------------------
# The recipe's `vision` section


VisionStageName = Literal["adapter", "sft", "reward", "rejection_sampling", "dpo"]
VISION_STAGES = ("adapter", "sft", "reward", "rejection_sampling", "dpo")
TRAINING_STAGES = ("adapter", "sft", "reward", "dpo")  # the stages with a trainer section
# With rejection sampling, which stage must come before which (the reward model scores the
# samples; sft and dpo train on them, `sft` before `reward` only when it does not).
_RS_ORDER = (("reward", "rejection_sampling"), ("rejection_sampling", "dpo"), ("sft", "dpo"),
             ("reward", "dpo"))

# What a stage trains (reference C1): the encoder, projector, cross-attention layers and the image
# token's embedding rows; "lm_lora" adds LoRA adapters on the language model (`lora`).
Trainable = Literal["encoder", "projector", "cross_attention", "image_rows", "score"]
ADAPTER_PARTS: list[str] = ["encoder", "projector", "cross_attention", "image_rows"]


class VisionTrainSection(TrainerSection):
    """A vision training stage: our keys below; any other key is a transformers
    `TrainingArguments` field (learning_rate, num_train_epochs, per_device_train_batch_size, ...).

    The language model stays frozen (Llama 3 §7.4-7.5) unless `lora` is set, which trains LoRA
    adapters on its linear layers and merges them when the stage saves.
    """

    data: list[SourceConfig] = Field(default_factory=list)
    kind: Literal["vision_chat", "image_text"] = "vision_chat"
    train: list[Trainable] = Field(default_factory=lambda: list(ADAPTER_PARTS))
    lora: LoraOptions | None = None
    max_length: int = Field(default=512, gt=0)

    def problems(self) -> list[tuple[str, str]]:
        problems = super().problems()
        if "score" in self.train and not isinstance(self, VisionRewardSection):
            problems.append(("train", "only the reward stage has a score head"))
        return problems


class VisionDPOSection(VisionTrainSection):
    """Vision DPO (Llama 3 §7.5): the sigmoid DPO loss plus `nll_weight` x NLL on the chosen
    answer, the reference being the model the stage starts from (log-probs computed once)."""

    kind: Literal["vision_preference"] = "vision_preference"  # type: ignore[assignment]
    beta: float = Field(default=0.1, gt=0)
    nll_weight: float = Field(default=0.2, ge=0)
    # as dpo.nll_normalization: per sequence (Pang et al. 2024, Llama 3) or per token (TRL)
    nll_normalization: Literal["sequence", "token"] = "sequence"


class VisionRewardSection(VisionTrainSection):
    """The vision reward model (Llama 3 §7.5): a score head on the vision model's last token.

    The encoder, the cross-attention layers and the score head train, the self-attention layers
    stay frozen; the loss is the pairwise one plus `penalty` x the mean squared reward over the
    batch (the paper's "weighted penalty on squared reward logits"; TRL's
    `center_rewards_coefficient` is the same idea on (r_c + r_r)^2). `text_reward_model`: a text
    reward model (LlamaForSequenceClassification, e.g. the `reward` stage's merged model) whose
    transformer and score head replace the language model's and a fresh head, as the paper
    initialises from the language RM. The reward model does not become the policy.
    """

    kind: Literal["vision_preference"] = "vision_preference"  # type: ignore[assignment]
    train: list[Trainable] = Field(default_factory=lambda: ["encoder", "cross_attention", "score"])
    penalty: float = Field(default=0.01, ge=0)
    text_reward_model: str | None = None
    eval_data: list[SourceConfig] = Field(default_factory=list)


class VisionRejectionSamplingSection(RejectionSamplingConfig):
    """Vision rejection sampling (Llama 3 §7.5, with the text stage's selection, reference A3):
    K samples per `vision_prompt` record from the current vision policy, scored by verifiers
    (`scoring.verifiers`, e.g. shapes) and/or the vision reward model (the `reward` stage listed
    before it in vision.stages, else `reward_model`: a vision_reward stage's model/ directory);
    the best kept as vision_chat records (for a later `sft`), best vs worst as vision_preference
    pairs (for a later `dpo`). System prompts are not supported yet (`system_prompts` stays [null]).
    """

    num_samples: int = Field(default=4, ge=1)
    max_new_tokens: int = Field(default=16, gt=0)
    batch_size: int = Field(default=16, gt=0)  # prompts per generate call (each gives its group's n)
    max_length: int = Field(default=512, gt=0)  # prompt tokens, as the training stages' max_length

    def problems(self) -> list[tuple[str, str]]:
        problems = super().problems()  # samples per prompt and scoring: the text section's rules
        if self.system_prompts != [None]:
            problems.append(("system_prompts", "not supported for vision prompts yet; leave it out"))
        return problems


class VisionEvaluation(Strict):
    """Held-out answer accuracy (greedy answers checked by `task`, a verifier of
    alignloop.reward.verifiers) before and after the stages, and whether text-only answers to
    `text_prompts` stay token-identical to the language model's (they must, with a frozen LM)."""

    task: str = "shapes"
    data: list[SourceConfig] = Field(default_factory=list)
    max_new_tokens: int = Field(default=8, gt=0)
    batch_size: int = Field(default=64, gt=0)
    text_prompts: list[str] = Field(default_factory=lambda: [
        "What is 12 plus 30?", "Name a colour.", "Write one short sentence about the sea."])
    before: bool = True  # also evaluate the starting model (base_eval/; the text check needs it)
    # also evaluate the model after each training stage but the last (round_1/eval_<stage>/), so
    # that the report has each later stage's own contribution as a paired difference
    stage_ablation: bool = False


class VisionConfig(Strict):
    """The `vision` section: where the vision model comes from and which stages train it.

    `start`: "new" attaches a fresh adapter and encoder (`adapter`) to the Llama text checkpoint
    in `model.path`; "mllama" reads an HF Mllama checkpoint (Llama 3.2 11B/90B Vision) from
    `model.path`. Each stage's model is saved in HF Mllama format (transformers, vLLM); with
    `architecture: llama3v` in Llama3V's own layout (alignloop.vision.llama3v, `llama3v`).
    """

    start: Literal["new", "mllama"] = "new"
    # cross_attention: Llama 3.2 Vision (saved as HF Mllama); llama3v: image tokens in the text
    architecture: Literal["cross_attention", "llama3v"] = "cross_attention"
    adapter_config: AdapterConfig = Field(default_factory=AdapterConfig)
    llama3v: Llama3VOptions = Field(default_factory=Llama3VOptions)
    tile_size: int | None = None  # default: the encoder's image_size
    stages: list[VisionStageName] = Field(default_factory=lambda: ["adapter"])
    adapter: VisionTrainSection = Field(default_factory=lambda: VisionTrainSection(kind="image_text"))
    sft: VisionTrainSection = Field(default_factory=VisionTrainSection)
    reward: VisionRewardSection = Field(default_factory=VisionRewardSection)
    rejection_sampling: VisionRejectionSamplingSection = Field(
        default_factory=VisionRejectionSamplingSection)
    dpo: VisionDPOSection = Field(default_factory=VisionDPOSection)
    evaluation: VisionEvaluation | None = None

    @model_validator(mode="after")
    def _llama3v_trains_the_projector(self) -> "VisionConfig":
        """Llama 3-V has no cross-attention layers or image rows: its stages train the projector
        unless their `train` says otherwise (checked by `problems`)."""
        if self.architecture == "llama3v":
            for stage in LLAMA3V_STAGES:
                section = getattr(self, stage)
                if "train" not in section.model_fields_set:
                    section.train = ["projector"]
        return self

    @model_validator(mode="after")
    def _rules(self) -> "VisionConfig":
        raise_problems(self.problems())
        return self

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for each rule the section breaks: the order of its stages, and what
        `start` and `architecture` rule out. What a stage needs from the others (data, prompts, a
        reward model) is alignloop.recipe_checks'."""
        order = _order_problem(self.stages)
        problems = [("stages", order)] if order else []
        if self.start == "mllama" and "adapter_config" in self.model_fields_set:
            problems.append(("adapter_config", "a fresh adapter is only built with start: new; an "
                                               "Mllama checkpoint brings its own"))
        return problems + _architecture_problems(self)

    def after_rejection_sampling(self, stage: str) -> bool:
        """Whether `stage` runs after rejection sampling (and so trains on its samples)."""
        stages = self.stages
        return "rejection_sampling" in stages and stage in stages and \
            stages.index(stage) > stages.index("rejection_sampling")


def _order_problem(stages: list[str]) -> str | None:
    if len(set(stages)) != len(stages):
        return "a vision stage is listed twice"
    if "rejection_sampling" not in stages:
        order = [s for s in TRAINING_STAGES if s in stages]
        if stages != order:
            return (f"vision stages run in the order {', '.join(TRAINING_STAGES)}; "
                    f"write them as [{', '.join(order)}]")
        return None
    at = {stage: i for i, stage in enumerate(stages)}
    wrong = [(a, b) for a, b in _RS_ORDER if a in at and b in at and at[a] > at[b]]
    if "adapter" in at and at["adapter"] != 0:
        wrong.insert(0, ("adapter", stages[0]))
    if "sft" in at and "reward" in at and at["reward"] < at["sft"] < at["rejection_sampling"]:
        wrong.append(("rejection_sampling", "sft"))
    if not wrong:
        return None
    return (f"vision stages with rejection_sampling: {wrong[0][0]} must run before {wrong[0][1]} "
            "(adapter first; reward before rejection_sampling; rejection_sampling before dpo; "
            "sft either before reward or after rejection_sampling), e.g. "
            "[adapter, sft, reward, rejection_sampling, dpo] or "
            "[adapter, reward, rejection_sampling, sft, dpo]")


def _architecture_problems(vision: VisionConfig) -> list[tuple[str, str]]:
    """What `architecture: llama3v` rules out, and llama3v options without it (whether a
    checkpoint named as its encoder exists is alignloop.recipe_checks')."""
    import math

    # compared with the defaults, not by whether the key is present: a resolved recipe.yaml
    # (dump_recipe) writes every section out
    if vision.architecture != "llama3v":
        if vision.llama3v != Llama3VOptions():
            return [("llama3v", "options of the Llama 3-V variant; set vision.architecture: llama3v, "
                                "or remove them")]
        return []
    problems, options = [], vision.llama3v
    if vision.start == "mllama":
        problems.append(("start", "'mllama' reads an HF Mllama (cross-attention) checkpoint; Mllama "
                                  "conversion is not supported for architecture llama3v: use start: new"))
    if vision.adapter_config != AdapterConfig():
        problems.append(("adapter_config", "cross-attention options; architecture llama3v takes "
                                           "vision.llama3v"))
    if vision.tile_size is not None:
        problems.append(("tile_size", "Mllama tiles; llama3v images are resized to the encoder's "
                                      "image_size (vision.llama3v.encoder_options)"))
    other = [stage for stage in vision.stages if stage not in LLAMA3V_STAGES]
    if other:
        problems.append(("stages", f"architecture llama3v runs the adapter and sft stages, not "
                                   f"{', '.join(other)} (not supported yet)"))
    for stage in (s for s in vision.stages if s in LLAMA3V_STAGES):
        train = getattr(vision, stage).train
        foreign = [part for part in train if part not in LLAMA3V_PARTS]
        if foreign:
            problems.append((f"{stage}.train", f"{', '.join(foreign)}: not a part of a llama3v model "
                                               "(it has projector and encoder)"))
        elif "encoder" in train and options.cache_features:
            problems.append((f"{stage}.train", "the encoder cannot train on cached features (they "
                                               "belong to a frozen encoder); set "
                                               "vision.llama3v.cache_features: false"))
    if options.encoder != "tiny" and options.encoder_options:
        problems.append(("llama3v.encoder_options", "overrides of the tiny encoder; a checkpoint "
                                                    "brings its own config"))
    tokens, patches = options.image_tokens, options.tiny_patches()
    if tokens is not None and (math.isqrt(tokens) ** 2 != tokens or (patches and tokens > patches)):
        limit = f" of at most the encoder's {patches} patches" if patches else ""
        problems.append(("llama3v.image_tokens", f"{tokens}: must be a square number{limit} "
                                                 "(the patch grid is average-pooled)"))
    return problems


def vision_sources(vision: VisionConfig) -> dict[str, list[SourceConfig]]:
    """Every data-source list of the vision section by its dotted key."""
    lists = {f"vision.{stage}.data": getattr(vision, stage).data for stage in TRAINING_STAGES}
    lists["vision.rejection_sampling.prompts"] = vision.rejection_sampling.prompts
    lists["vision.reward.eval_data"] = vision.reward.eval_data
    if vision.evaluation is not None:
        lists["vision.evaluation.data"] = vision.evaluation.data
    return lists
