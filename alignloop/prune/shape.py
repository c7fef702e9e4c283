"""The pruned model's shape and which units it keeps.

`resolve` turns a recipe's `prune.target` into a whole shape for the model at hand (the checks
that need the model's config raise StageError naming the key and both numbers); `count` is the
parameter count of a shape; `select` picks the units to keep from their importance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from alignloop.pipeline.errors import StageError
from alignloop.prune.config import PruneConfig
from alignloop.prune.importance import Importance


@dataclass(frozen=True)
class Shape:
    """What LlamaConfig says about a model's size (heads: query heads per KV group)."""

    num_hidden_layers: int
    hidden_size: int
    num_key_value_heads: int
    heads_per_group: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def of(cls, config) -> "Shape":
        return cls(config.num_hidden_layers, config.hidden_size, config.num_key_value_heads,
                   config.num_attention_heads // config.num_key_value_heads, config.head_dim,
                   config.intermediate_size, config.vocab_size, bool(config.tie_word_embeddings),
                   bool(getattr(config, "attention_bias", False)), bool(getattr(config, "mlp_bias", False)))

    @property
    def num_attention_heads(self) -> int:
        return self.num_key_value_heads * self.heads_per_group

    def as_json(self) -> dict:
        return {**asdict(self), "num_attention_heads": self.num_attention_heads}


def count(shape: Shape) -> int:
    """Parameters of a Llama of this shape (tied embeddings counted once), as num_parameters()."""
    h, f = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim  # query width; o_proj reads it back
    kv = shape.num_key_value_heads * shape.head_dim
    attention = 2 * h * q + 2 * h * kv + (q + 2 * kv + h if shape.attention_bias else 0)
    mlp = 3 * h * f + (2 * f + h if shape.mlp_bias else 0)
    layer = attention + mlp + 2 * h  # + the two RMSNorms
    embeddings = shape.vocab_size * h * (1 if shape.tie_word_embeddings else 2)
    return embeddings + shape.num_hidden_layers * layer + h  # + the final norm


def resolve(section: PruneConfig, config, label: str) -> Shape:
    """The target shape for a model with LlamaConfig `config`. Raises StageError (prefixed with
    the stage's `label`) for a target the model cannot have: larger than the model on an axis,
    query heads that do not split evenly into its KV groups, a strided head_dim that does not
    divide the model's, or a parameter budget it cannot reach."""
    model, target = Shape.of(config), section.target

    def fail(key: str, message: str):
        raise StageError(f"{label}: prune.target.{key}: {message}")

    given = target.given()
    heads = given.pop("num_attention_heads", None)
    if heads is not None:
        if heads % model.num_key_value_heads:
            fail("num_attention_heads", f"{heads} query heads do not split evenly over the model's "
                 f"{model.num_key_value_heads} key-value heads (every group keeps the same count); "
                 f"use a multiple of {model.num_key_value_heads}")
        given["heads_per_group"] = heads // model.num_key_value_heads
    for axis, value in given.items():
        if value > getattr(model, axis):
            key = "num_attention_heads" if heads is not None and axis == "heads_per_group" else axis
            have = heads if key == "num_attention_heads" else value
            fail(key, f"{have} is more than the model's {getattr(model, key)}; pruning only removes")
    new_dim = given.get("head_dim", model.head_dim)
    if section.rope_pairs == "strided" and model.head_dim % new_dim:
        fail("head_dim", f"rope_pairs: strided keeps every s-th RoPE pair, so {new_dim} must divide "
             f"the model's head_dim {model.head_dim}; choose a divisor or set prune.rope_pairs: "
             "importance")
    tied = model.tie_word_embeddings if section.tie_embeddings is None else section.tie_embeddings
    shape = Shape(**{**asdict(model), **given, "tie_word_embeddings": tied})
    if target.params is not None:
        shape = _meet_budget(shape, model, target.params, set(given), section.round_to, fail)
    return shape


def _meet_budget(shape: Shape, model: Shape, budget: int, given: set[str], multiple: int, fail) -> Shape:
    """The largest shape under `budget` parameters that shrinks the free ones of hidden_size and
    intermediate_size by one common factor r, each rounded down to a multiple of `multiple`
    (at least one multiple). Monotone in r, so a bisection over r finds it."""
    before = count(model)
    if budget >= before:
        fail("params", f"{budget:,} is not below the model's {before:,} parameters")
    free = [axis for axis in ("hidden_size", "intermediate_size") if axis not in given]

    def scaled(r: float) -> Shape:
        sizes = {axis: max(multiple, int(getattr(shape, axis) * r) // multiple * multiple) for axis in free}
        return Shape(**{**asdict(shape), **sizes})

    smallest = scaled(0.0)
    if count(smallest) > budget:
        fail("params", f"{budget:,} is below {count(smallest):,}, the smallest model with the other "
             f"axes as given ({', '.join(free)} = {multiple}); prune other axes too")
    low, high = 0.0, 1.0
    if count(scaled(high)) <= budget:
        return scaled(high)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if count(scaled(mid)) <= budget else (low, mid)
    return scaled(low)


# ---------------------------------------------------------------------------------------------
# Which units stay


@dataclass
class Kept:
    """Indices into the original model, sorted. g KV groups; primes are the pruned sizes."""

    layers: list[int]       # the layers kept, in order
    hidden: Tensor          # (h',)
    neurons: list[Tensor]   # per kept layer (f',)
    heads: list[Tensor]     # per kept layer (g, p'): query heads by position within their group
    qk_pairs: list[Tensor]  # per kept layer (g, d'/2): RoPE pairs j = channels (j, j + d/2)
    v_dims: list[Tensor]    # per kept layer (g, d')

    def as_json(self) -> dict:
        return {name: value if name == "layers" else
                (value.tolist() if isinstance(value, Tensor) else [t.tolist() for t in value])
                for name, value in vars(self).items()}


def top(scores: Tensor, k: int) -> Tensor:
    """The indices of the k best scores along the last axis, in ascending order; ties go to the
    lower index, so that keeping everything keeps 0..n-1."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :k].sort(dim=-1).values


def select(scores: Importance, model: Shape, shape: Shape, section: PruneConfig) -> Kept:
    """The units a model of `shape` keeps: the best of each axis by `scores`, per layer for
    neurons, heads (within each KV group: every kept query head stays with its key-value head)
    and head_dim channels (per KV group, the same for q and k, as RoPE pairs)."""
    drop = model.num_hidden_layers - shape.num_hidden_layers
    if drop == 0:
        layers = list(range(model.num_hidden_layers))
    elif section.layers == "contiguous":
        start = int(torch.argmin(scores.blocks))  # the block whose removal changes h least
        layers = [i for i in range(model.num_hidden_layers) if not start <= i < start + drop]
    else:
        layers = top(scores.layers, shape.num_hidden_layers).tolist()
    pairs = shape.head_dim // 2
    stride = model.head_dim // shape.head_dim if model.head_dim % shape.head_dim == 0 else None
    strided = torch.arange(pairs) * stride if stride else None  # frequencies of the new grid

    def qk(i: int) -> Tensor:
        if section.rope_pairs == "strided":
            return strided.expand(model.num_key_value_heads, pairs)
        return top(scores.qk_pairs[i], pairs)

    return Kept(layers=layers, hidden=top(scores.hidden, shape.hidden_size),
                neurons=[top(scores.neurons[i], shape.intermediate_size) for i in layers],
                heads=[top(scores.heads[i], shape.heads_per_group) for i in layers],
                qk_pairs=[qk(i) for i in layers],
                v_dims=[top(scores.v_dims[i], shape.head_dim) for i in layers])
