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
import functools
import importlib.util
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from alignloop.data.source_config import OnError, SourceConfig

STAGES = ("sft",)
BUILTIN_MODEL = "builtin:tiny"


class RecipeError(ValueError):
    """A recipe that cannot run. `problems` holds one `where: key: message` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid recipe:\n  " + "\n  ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The checkpoint to post-train and its tokenizer."""

    path: str = BUILTIN_MODEL  # a local HF directory, a hub id, or builtin:tiny
    tokenizer: str | None = None  # defaults to `path`
    # "auto": the tokenizer's own template ({% generation %} markers added when it is a Llama 3
    # template); "llama3": alignloop's Llama 3 template; or a path to a .jinja file with markers.
    chat_template: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attn_implementation: str = "sdpa"
    revision: str | None = None
    tiny: dict[str, Any] = Field(default_factory=dict)  # LlamaConfig overrides for builtin:tiny


class LoraOptions(_Strict):
    r: int = Field(default=16, gt=0)
    alpha: float = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    modules_to_save: list[str] | None = None


class QuantizationOptions(_Strict):
    """bitsandbytes quantization of the frozen base for QLoRA."""

    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class SFTStageConfig(BaseModel):
    """The `sft` section: our keys below; any other key is an SFTConfig option."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    method: Literal["full", "lora", "qlora"] = "full"
    lora: LoraOptions | None = None
    quantization: QuantizationOptions | None = None
    merge: bool = False  # also save the LoRA-merged model (HF format, safetensors)
    data: list[SourceConfig] = Field(default_factory=list)
    eval_data: list[SourceConfig] = Field(default_factory=list)
    # An example whose loss mask is empty after truncation: stop with an error, or skip and count it.
    empty_mask: Literal["error", "skip"] = "error"
    keep_checkpoints: bool = False

    @property
    def trainer_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class EvaluationConfig(_Strict):
    """Held-out task accuracy, measured before and after training."""

    task: str  # a verifier name from alignloop.data.tasks.VERIFIERS
    data: list[SourceConfig]
    max_new_tokens: int = Field(default=32, gt=0)
    batch_size: int = Field(default=64, gt=0)
    temperature: float = Field(default=0.0, ge=0)
    before: bool = True  # also evaluate the starting model


class Recipe(_Strict):
    """A whole recipe. `source` is the file it came from (for messages and relative paths)."""

    seed: int = 0
    output_dir: Path = Path("runs/default")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    bad_records: OnError = "raise"  # what to do with a data record that breaks its contract
    model: ModelConfig = Field(default_factory=ModelConfig)
    stages: list[Literal["sft"]] = Field(default_factory=lambda: ["sft"])
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    evaluation: EvaluationConfig | None = None
    source: str = Field(default="<dict>", exclude=True)

    @model_validator(mode="after")
    def _no_duplicate_stages(self) -> "Recipe":
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("a stage is listed twice")
        return self


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
            problems += [p for stage in STAGES for p in _construct(cfg, stage, where)]
    if problems:
        raise RecipeError(problems)
    return cfg


class _Where:
    """Formats `file:line: key: message`, walking up to the nearest key whose line is known."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines = source, lines

    def __call__(self, key: str, message: str) -> str:
        probe = key
        while probe and probe not in self.lines:
            probe = probe.rpartition(".")[0]
        line = self.lines.get(probe)
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
            return f"unknown key (did you mean 'sft.{key}'? trainer options go in the stage's section)"
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


def _resolve_paths(cfg: Recipe, base: Path, where: _Where) -> list[str]:
    problems = []
    for key in ("path", "tokenizer"):
        value = getattr(cfg.model, key)
        if value is None or value == BUILTIN_MODEL:
            continue
        local = (base / Path(value).expanduser()).resolve()
        if local.exists():
            setattr(cfg.model, key, str(local))
        elif _looks_local(value):
            problems.append(where(f"model.{key}", f"no such directory: {local}"))
        # otherwise: a hub id such as meta-llama/Llama-3.2-1B-Instruct, fetched (or read from the
        # HF cache) when the stage starts.
    if cfg.model.chat_template not in ("auto", "llama3"):
        template = (base / cfg.model.chat_template).resolve()
        if not template.is_file():
            problems.append(where("model.chat_template",
                                  f"expected 'auto', 'llama3' or a .jinja file; no such file: {template}"))
        else:
            cfg.model.chat_template = str(template)
    sections = [("sft.data", cfg.sft.data), ("sft.eval_data", cfg.sft.eval_data)]
    if cfg.evaluation:
        sections.append(("evaluation.data", cfg.evaluation.data))
    for key, sources in sections:
        for i, src in enumerate(sources):
            if src.path is None:
                continue
            src.path = (base / src.path.expanduser()).resolve()
            if not src.path.exists():
                problems.append(where(f"{key}.{i}.path", f"no such file or directory: {src.path}"))
    return problems


def _check_combinations(cfg: Recipe, where: _Where) -> list[str]:
    problems = []
    sft = cfg.sft
    if "sft" in cfg.stages and not sft.data:
        problems.append(where("sft.data", "the sft stage needs at least one data source"))
    if sft.method == "full":
        for key in ("lora", "quantization"):
            if getattr(sft, key) is not None:
                problems.append(where(f"sft.{key}", f"only used when sft.method is lora or qlora "
                                                    f"(it is 'full')"))
        if sft.merge:
            problems.append(where("sft.merge", "merging needs sft.method lora or qlora"))
    if sft.method == "lora" and sft.quantization is not None:
        problems.append(where("sft.quantization", "quantization is for sft.method: qlora"))
    if sft.method == "qlora" and not _has_module("bitsandbytes"):
        problems.append(where("sft.method", "qlora needs bitsandbytes, which is not installed "
                                            "(pip install bitsandbytes), or use method: lora"))
    problems += _check_precision(cfg, where)
    report_to = sft.trainer_options.get("report_to")
    for name in [report_to] if isinstance(report_to, str) else (report_to or []):
        module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(name)
        if module and not _has_module(module):
            problems.append(where("sft.report_to", f"'{name}' needs the {module} package "
                                                   f"(pip install 'alignloop[tracking]')"))
    problems += _check_builtins(cfg, where)
    if cfg.evaluation is not None:
        from alignloop.data.tasks import VERIFIERS

        if cfg.evaluation.task not in VERIFIERS:
            problems.append(where("evaluation.task", f"unknown task '{cfg.evaluation.task}' "
                                                     f"(known: {', '.join(sorted(VERIFIERS))})"))
    return problems


def _check_builtins(cfg: Recipe, where: _Where) -> list[str]:
    from alignloop.data.tasks import BUILTIN

    lists = {"sft.data": cfg.sft.data, "sft.eval_data": cfg.sft.eval_data,
             "evaluation.data": cfg.evaluation.data if cfg.evaluation else []}
    return [where(f"{key}.{i}.builtin", f"unknown builtin dataset '{src.builtin}' "
                                        f"(known: {', '.join(sorted(BUILTIN))})")
            for key, sources in lists.items() for i, src in enumerate(sources)
            if src.builtin is not None and src.builtin not in BUILTIN]


def _check_precision(cfg: Recipe, where: _Where) -> list[str]:
    options = cfg.sft.trainer_options
    wants_bf16 = cfg.precision == "bf16" or options.get("bf16") is True
    wants_fp16 = cfg.precision == "fp16" or options.get("fp16") is True
    key = "precision" if cfg.precision in ("bf16", "fp16") else "sft.bf16" if wants_bf16 else "sft.fp16"
    if wants_bf16 and wants_fp16:
        return [where(key, "bf16 and fp16 are both on; choose one")]
    if wants_bf16 and not bf16_supported():
        return [where(key, "bf16 was asked for, but this machine has no CUDA GPU and its CPU has no "
                           "native bfloat16 (AVX512-BF16/AMX); use precision: auto or fp32")]
    if wants_fp16 and not _cuda():
        return [where(key, "fp16 mixed precision needs a CUDA GPU; use precision: auto or fp32")]
    return []


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def bf16_supported() -> bool:
    """bf16 on a CUDA GPU that has it, or on a CPU with native bf16 instructions."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolved_precision(cfg: Recipe) -> str:
    """`auto` becomes bf16 on a CUDA GPU that has it, else fp32.

    A CPU with native bf16 (AVX512-BF16 / AMX) may still be asked for bf16 explicitly; `auto`
    keeps CPU runs in fp32 so that the same recipe gives the same numbers on every CPU.
    """
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if _cuda() and bf16_supported() else "fp32"


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
    from trl import SFTConfig

    return {"sft": SFTConfig}[stage]


def _trainer_fields(stage: str) -> set[str]:
    return {f.name for f in dataclasses.fields(trl_config_class(stage)) if f.init}


def _check_trainer_options(cfg: Recipe, where: _Where) -> list[str]:
    problems = []
    for stage in STAGES:
        section = getattr(cfg, stage)
        options = section.trainer_options
        if not options:
            continue
        config_cls = trl_config_class(stage)
        fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
        for key, value in options.items():
            if key in _MANAGED:
                problems.append(where(f"{stage}.{key}", f"not settable here: {_MANAGED[key]}"))
            elif key not in fields:
                ours = [k for k in type(section).model_fields]
                hint = difflib.get_close_matches(key, [*fields, *ours], n=1)
                problems.append(where(f"{stage}.{key}", "unknown key"
                                      + (f" (did you mean '{hint[0]}'?)" if hint else "")
                                      + f"; not an alignloop key nor a {config_cls.__name__} field"))
            else:
                problem = _check_type(fields[key].type, value)
                if problem:
                    problems.append(where(f"{stage}.{key}", problem))
    return problems


def _check_type(annotation: Any, value: Any) -> str | None:
    try:
        TypeAdapter(annotation).validate_python(value)
    except ValidationError as err:
        return f"{err.errors()[0]['msg']} (got {value!r})"
    except Exception:  # an annotation pydantic cannot build a validator for: the TRL config decides
        return None
    return None


def _construct(cfg: Recipe, stage: str, where: _Where) -> list[str]:
    import tempfile

    try:
        trainer_args(cfg, stage, Path(tempfile.gettempdir()) / "alignloop-validate")
    except Exception as err:  # TRL / transformers validation: its message is the useful part
        return [where(stage, f"{trl_config_class(stage).__name__} rejected these options: {err}")]
    return []


def trainer_args(cfg: Recipe, stage: str, output_dir: Path):
    """The stage's TRL config: our defaults, then the recipe's options, then what we manage."""
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
        "use_cpu": not _cuda(),
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
    }
    options.update(section.trainer_options)
    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing; both are
    # accepted in recipes, and TRL's default (on) is passed under the new name.
    legacy = options.pop("gradient_checkpointing", True)
    options.setdefault("activation_checkpointing", legacy)
    options["output_dir"] = str(output_dir)
    if stage == "sft":
        # Labels are built by alignloop (assistant tokens only), so TRL sees a tokenized dataset.
        options.setdefault("max_length", 1024)
    return trl_config_class(stage)(**options)


def dump_recipe(cfg: Recipe) -> str:
    """The resolved recipe as YAML (written beside the artifacts)."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)
