"""LoRA on Mixture-of-Experts checkpoints: what to adapt, and an audit of what was (docs/moe.md).

transformers 5.25 stores the routed experts of Mixtral, Qwen3-MoE, OLMoE and Llama 4 as two 3D
parameters of one experts module, `gate_up_proj` and `down_proj`, beside a router (`gate` or
`router`) and, in Llama 4, a shared expert made of nn.Linear layers. nn.Linear names select
nothing inside the routed experts: peft adapts them through `target_parameters` (one rank-r
pair per expert, no dropout, no DoRA). Left to itself, peft 0.21's `all-linear` also adapts the
router (a ParamWrapper on Mixtral-style routers; a lora.Linear on Llama 4's nn.Linear router,
whose tuple output then breaks the forward) and never reaches Llama 4's experts.

So on an MoE checkpoint the LoRA options resolve here, per model, by what the model holds:

    target_modules: all-linear -> every nn.Linear of the decoder (attention, shared experts,
                                  dense MLPs) except the routers and the heads
    lora.experts: true         -> target_parameters <experts>.gate_up_proj, <experts>.down_proj
    lora.router: lora | full   -> target_parameters <router>.weight | modules_to_save <router>

and after peft has wrapped the model `coverage` counts, per kind of tensor, what got an adapter;
`check_coverage` stops a run whose routed experts were asked for and are not all adapted, or
whose router was adapted without being asked for. A target that matches nothing stops it first
(`lora_targets`), with the recipe key that named it, on dense models too.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch

from alignloop.pipeline.errors import StageError

logger = logging.getLogger("alignloop.models")

ROUTER_NAMES = ("gate", "router")  # the routing module beside `experts` in an MoE block
SHARED_PREFIX = "shared_expert"  # shared_expert (Llama 4, Qwen2-MoE), shared_experts (DeepSeek)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")
HEADS = ("lm_head", "score")  # output layers: never in a resolved all-linear
# v4-era names of expert linears: they select nothing inside transformers 5's fused experts
V4_EXPERT_NAMES = {"w1", "w2", "w3", "gate_proj", "up_proj", "down_proj", "experts"}


class LoraTargetError(StageError):
    """A LoRA setting that cannot be trained as asked: `key` is the recipe key (e.g.
    `sft.lora.target_modules.2`), `message` what is wrong and what would fix it. The text is
    `where(key, message)` (alignloop.recipe_source.stage_where: file, line, key), else
    `key: message`."""

    def __init__(self, key: str, message: str, where=None):
        self.key, self.message = key, message
        super().__init__(where(key, message) if where else f"{key}: {message}")


@dataclass
class MoeBlock:
    """One sparse layer: module paths (as in model.named_modules()) of its parts."""

    experts: str
    router: str | None
    shared: list[str]
    num_experts: int


@dataclass
class LoraTargets:
    """What peft's LoraConfig gets, resolved for one model, and notes for the log."""

    target_modules: list[str] | str
    target_parameters: list[str] = field(default_factory=list)
    modules_to_save: list[str] | None = None
    dropout: float = 0.0
    notes: list[str] = field(default_factory=list)


def moe_blocks(model: torch.nn.Module) -> list[MoeBlock]:
    """The sparse layers of a model, peft-wrapped or not (none: a dense model). An experts module
    is one holding 3D `gate_up_proj` and `down_proj` parameters; its router is the sibling `gate`
    / `router` with an (E, H) weight; its shared experts the siblings named shared_expert*."""
    modules = {}
    for name, module in model.named_modules():  # parents first: a wrapped module's base wins
        if ".lora_" not in name:
            modules[base_name(name)] = module
    blocks = []
    for name, module in modules.items():
        params = dict(module.named_parameters(recurse=False))
        if not all(getattr(params.get(p), "ndim", 0) == 3 for p in EXPERT_PARAMETERS):
            continue
        parent = name.rpartition(".")[0]
        experts = params["gate_up_proj"].shape[0]
        router = next((f"{parent}.{r}" for r in ROUTER_NAMES
                       if tuple(getattr(getattr(modules.get(f"{parent}.{r}"), "weight", None),
                                        "shape", ()))[:1] == (experts,)), None)
        shared = [n for n in modules if n.rpartition(".")[0] == parent
                  and n.rpartition(".")[2].startswith(SHARED_PREFIX)]
        blocks.append(MoeBlock(name, router, shared, experts))
    return blocks


def _suffix(path: str) -> str:
    """`model.layers.3.mlp.experts` -> `mlp.experts`: the path inside a decoder layer."""
    return re.sub(r"^.*?\.\d+\.", "", path)


def _matches(name: str, key: str) -> bool:
    """peft's rule for a target_modules entry: the whole name or its last dotted parts."""
    return name == key or name.endswith(f".{key}")


def _linear_names(model, blocks: list[MoeBlock]) -> list[str]:
    """What `all-linear` stands for on an MoE model: the last name of every nn.Linear of the
    decoder but the routers' and the heads'."""
    routers = {b.router for b in blocks}
    names = {n.rpartition(".")[2] for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n not in routers}
    return sorted(names - set(HEADS) - set(ROUTER_NAMES))


def lora_targets(model, options, key: str = "lora", where=None) -> LoraTargets:
    """The LoraConfig targets of `options` (alignloop.options.LoraOptions) on `model`; `key` is
    the options' recipe key, for errors (formatted by `where`). Raises LoraTargetError for a
    target_modules entry that selects no module of the model, on an MoE model for one that
    selects a router (the router is `lora.router`'s), and for dropout set explicitly together
    with expert or router LoRA."""
    blocks = moe_blocks(model)
    names = [n for n, _ in model.named_modules()]
    wanted = options.target_modules
    if isinstance(wanted, list):
        _check_names(wanted, names, blocks, key, where)
    if not blocks:
        return LoraTargets(wanted, modules_to_save=options.modules_to_save, dropout=options.dropout)
    out = LoraTargets(_linear_names(model, blocks) if wanted == "all-linear" else wanted,
                      modules_to_save=options.modules_to_save, dropout=options.dropout)
    if options.experts:
        experts = {f"{_suffix(b.experts)}.{p}" for b in blocks for p in EXPERT_PARAMETERS}
        out.target_parameters += sorted(experts)
    routers = sorted({_suffix(b.router) for b in blocks if b.router})
    if options.router == "lora":
        out.target_parameters += [f"{r}.weight" for r in routers]
    elif options.router == "full":
        out.modules_to_save = [*(options.modules_to_save or []), *routers]
    if out.target_parameters and out.dropout > 0:
        if "dropout" in options.model_fields_set:
            raise LoraTargetError(f"{key}.dropout", f"{options.dropout:g}: peft adapts the routed "
                                  "experts (and a LoRA router) through target_parameters, which "
                                  "have no dropout; set dropout: 0, or lora.experts: false and "
                                  "lora.router: frozen", where)
        out.dropout = 0.0
        out.notes.append("dropout 0: peft's target_parameters (experts, router) take none")
    return out


def _check_names(wanted: list[str], names: list[str], blocks: list[MoeBlock], key: str, where) -> None:
    routers = {b.router for b in blocks}
    for i, target in enumerate(wanted):
        hits = [n for n in names if _matches(n, target)]
        if any(n in routers for n in hits):
            raise LoraTargetError(f"{key}.target_modules.{i}", f"'{target}' selects the router "
                                  f"({next(n for n in hits if n in routers)}); the router is set "
                                  "by lora.router: frozen (default), lora or full", where)
        if hits:
            continue
        hint = ""
        if blocks and target in V4_EXPERT_NAMES:
            hint = (" (a transformers 4 name: the routed experts are now fused 3D parameters, "
                    f"{blocks[0].experts}.gate_up_proj / .down_proj, adapted by lora.experts: true)")
        leaves = sorted({n.rpartition(".")[2] for n in names if n and not n[-1].isdigit()})
        raise LoraTargetError(f"{key}.target_modules.{i}", f"'{target}' matches no module of the "
                              f"model{hint}; its module names end in: {', '.join(leaves)}", where)


def trl_ready(model) -> None:
    """What TRL 1.16's fused LM head and MoE loss read, on a loaded Llama 4 text model
    (Llama4ForCausalLM) of transformers 5.25: the backbone through `base_model_prefix`, which the
    class says is `language_model` while the attribute is `model` (so `base_model` is the whole
    model and the fused head fails), and `config.num_experts`, which Llama 4 calls
    num_local_experts. Both set on this instance and its config only."""
    text = model.config.get_text_config()
    if not hasattr(text, "num_experts") and hasattr(text, "num_local_experts"):
        text.num_experts = text.num_local_experts
    if not hasattr(model, model.base_model_prefix) and hasattr(model, "model"):
        model.base_model_prefix = "model"


# ---------------------------------------------------------------------------------------------
# The audit


KINDS = ("attention", "routed experts", "shared experts", "router", "dense mlp", "other")


def _kind(path: str, param: str | None, blocks: list[MoeBlock]) -> str:
    for b in blocks:
        if path == b.experts and param in EXPERT_PARAMETERS:
            return "routed experts"
        if path == b.router:
            return "router"
        if any(path == s or path.startswith(f"{s}.") for s in b.shared):
            return "shared experts"
    if "attn" in path or "attention" in path:
        return "attention"
    if ".mlp." in path or ".feed_forward." in path:
        return "dense mlp"
    return "other"


def base_name(name: str) -> str:
    """A peft-wrapped module's name as in the base model: no `base_model.model.` prefix, no
    `.base_layer` of nested ParamWrappers, no `.modules_to_save.default` copy."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return re.sub(r"\.(modules_to_save\.[^.]+|original_module)$", "", name)


def coverage(model) -> list[dict]:
    """Per kind of tensor (KINDS) of a peft-wrapped model: how many there are, how many carry a
    LoRA and how many train in full (modules_to_save), with up to 3 examples of the untouched.
    Counted: every nn.Linear weight but the heads', each routed expert parameter, each router."""
    from peft.tuners.lora import LoraLayer, ParamWrapper
    from peft.utils import ModulesToSaveWrapper

    base = model.get_base_model()
    blocks = moe_blocks(base)
    lora, full, tensors = set(), set(), {}
    for name, module in base.named_modules():
        if isinstance(module, ParamWrapper):
            lora.add((base_name(name), module.parameter_name))
        elif isinstance(module, LoraLayer):
            lora.add((base_name(name), "weight"))
        elif isinstance(module, ModulesToSaveWrapper):
            full.add(base_name(name))
        elif isinstance(module, torch.nn.Linear) and ".lora_" not in name \
                and base_name(name).rpartition(".")[2] not in HEADS:
            tensors[(base_name(name), "weight")] = None
    for b in blocks:
        tensors.update({(b.experts, p): None for p in EXPERT_PARAMETERS})
        if b.router:
            tensors[(b.router, "weight")] = None
    rows = {kind: {"kind": kind, "tensors": 0, "lora": 0, "full": 0, "untouched": []} for kind in KINDS}
    for path, param in tensors:
        row = rows[_kind(path, param, blocks)]
        row["tensors"] += 1
        row["lora"] += (path, param) in lora
        row["full"] += path in full
        if (path, param) not in lora and path not in full and len(row["untouched"]) < 3:
            row["untouched"].append(f"{path}.{param}")
    return [r for r in rows.values() if r["tensors"]]


def check_coverage(rows: list[dict], options, key: str = "lora", where=None) -> None:
    """Raises LoraTargetError when the routed experts were asked for (lora.experts) and some
    have no adapter, or the router carries one that lora.router did not ask for."""
    kinds = {r["kind"]: r for r in rows}
    experts, router = kinds.get("routed experts"), kinds.get("router")
    if experts and options.experts and experts["lora"] < experts["tensors"]:
        raise LoraTargetError(f"{key}.experts", f"{experts['tensors'] - experts['lora']} of "
                              f"{experts['tensors']} routed-expert tensors got no adapter (e.g. "
                              f"{', '.join(experts['untouched'])}); the run would train without "
                              "them. Give lora.target_modules as nn.Linear names (q_proj, ...) and "
                              "leave the experts to lora.experts, or set lora.experts: false", where)
    if router and options.router != "lora" and router["lora"]:
        raise LoraTargetError(f"{key}.router", f"{router['lora']} router(s) got a LoRA adapter "
                              f"although lora.router is {options.router}; remove the router from "
                              "lora.target_modules or set lora.router: lora", where)


def format_coverage(rows: list[dict]) -> str:
    """The audit as a text table for the log."""
    lines = [f"{'kind':<16}{'tensors':>8}{'lora':>7}{'full':>7}"]
    lines += [f"{r['kind']:<16}{r['tensors']:>8}{r['lora']:>7}{r['full']:>7}" for r in rows]
    return "\n".join(lines)
