"""How much each prunable unit of a Llama matters: from its activations on calibration data
(Minitron, arXiv 2407.14679), from weight norms, or a seeded draw (the two baselines).

Activations are read with forward hooks on the modules of an unmodified transformers Llama:

    hidden channels   outputs of every RMSNorm (input_layernorm, post_attention_layernorm of
                      each layer, the final norm), summed over the 2L + 1 norms
    MLP neurons       the input of down_proj: act(gate(x)) * up(x)
    attention heads   the input of o_proj, split per head: the L2 norm of each head's output
    q/k RoPE pairs    q_proj and k_proj outputs as pairs (i, i + d/2); a pair's norm is the same
                      before and after RoPE, which rotates it; score = q's x k's (per KV group)
    v channels        the input of o_proj per channel, summed over the query heads of a group
    layers            block influence 1 - cos(h_in, h_out) of the residual stream (ShortGPT,
                      arXiv 2403.03853; Minitron's depth-pruning metric)

Each per-token magnitude is averaged over a record's tokens and the record means are combined
by their L2 norm (sqrt of the sum of squares over records): one of the (sequence, batch)
aggregations Minitron compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Importance:
    """Scores per unit, higher = more important. L layers, h hidden, f intermediate, g KV groups,
    p query heads per group, d head_dim."""

    hidden: Tensor        # (h,)
    neurons: list[Tensor]  # L x (f,)
    heads: list[Tensor]    # L x (g, p)
    qk_pairs: list[Tensor]  # L x (g, d/2): pair j is channels (j, j + d/2) of q and k
    v_dims: list[Tensor]   # L x (g, d)
    layers: Tensor        # (L,) influence of each layer alone
    blocks: Tensor        # (L - n + 1,) influence of each run of n contiguous layers

    def as_json(self) -> dict:
        def rounded(t: Tensor):
            return [float(f"{x:.6g}") for x in t.flatten().tolist()] if t.dim() < 2 else \
                [rounded(row) for row in t]
        return {name: rounded(value) if isinstance(value, Tensor) else [rounded(v) for v in value]
                for name, value in vars(self).items()}


def _geometry(config) -> tuple[int, int, int, int]:
    """(layers, KV groups, query heads per group, head_dim) of a LlamaConfig."""
    groups = config.num_key_value_heads
    return config.num_hidden_layers, groups, config.num_attention_heads // groups, config.head_dim


# ---------------------------------------------------------------------------------------------
# Activations


class _Recorder:
    """Forward hooks that add each batch's statistics into sums of squares of record means."""

    def __init__(self, model, window: int):
        config = model.config
        self.layers, self.groups, self.per, self.d = _geometry(config)
        self.window = window  # layers to drop as one block
        self.mask: Tensor | None = None  # (B, T) of the batch in flight, 1 on real tokens
        L, h, f, heads = self.layers, config.hidden_size, config.intermediate_size, self.groups * self.per
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        self.norms = zeros(2 * L + 1, h)
        self.neurons, self.heads = zeros(L, f), zeros(L, heads)
        self.v, self.q = zeros(L, heads, self.d), zeros(L, heads, self.d // 2)
        self.k = zeros(L, self.groups, self.d // 2)
        self.cos_layer, self.cos_block = zeros(L), zeros(L - window + 1)
        self.records = 0
        self.residual: list[Tensor] = []  # h_0 .. h_L of the batch in flight
        self.handles = []
        decoder = model.model
        for i, layer in enumerate(decoder.layers):
            self._hook(layer.input_layernorm, self._norm(2 * i))
            self._hook(layer.post_attention_layernorm, self._norm(2 * i + 1))
            self._hook(layer.mlp.down_proj, self._neurons(i), pre=True)
            self._hook(layer.self_attn.o_proj, self._o_input(i), pre=True)
            self._hook(layer.self_attn.q_proj, self._pairs(self.q, i, self.groups * self.per))
            self._hook(layer.self_attn.k_proj, self._pairs(self.k, i, self.groups))
            self._hook(layer, self._layer_output)
        self._hook(decoder.norm, self._norm(2 * L))
        self._hook(decoder.layers[0], self._layer_input, pre=True)

    def _hook(self, module, fn, pre: bool = False) -> None:
        if pre:
            self.handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self.handles.append(module.register_forward_hook(fn))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _record_means(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (B, ...): the mean over each record's real tokens."""
        weights = self.mask / self.mask.sum(1, keepdim=True)  # (B, T)
        return torch.einsum("bt,bt...->b...", weights, x.float())

    def _add(self, total: Tensor, x: Tensor) -> None:
        """Adds the squares of the record means of x (B, T, ...) to `total` (...)."""
        total += self._record_means(x).double().pow(2).sum(0).cpu()

    def _norm(self, row: int):
        return lambda module, args, out: self._add(self.norms[row], out.abs())

    def _neurons(self, i: int):
        return lambda module, args, kwargs: self._add(self.neurons[i], args[0].abs())

    def _o_input(self, i: int):
        def hook(module, args, kwargs):
            x = args[0].unflatten(-1, (self.groups * self.per, self.d))  # (B, T, heads, d)
            self._add(self.heads[i], x.float().norm(dim=-1))
            self._add(self.v[i], x.abs())
        return hook

    def _pairs(self, total: Tensor, i: int, heads: int):
        def hook(module, args, out):
            x = out.unflatten(-1, (heads, 2, self.d // 2)).float()  # (B, T, heads, 2, d/2)
            self._add(total[i], x.norm(dim=-2))                     # (B, T, heads, d/2)
        return hook

    def _layer_input(self, module, args, kwargs):
        self.residual = [args[0] if args else kwargs["hidden_states"]]

    def _layer_output(self, module, args, out):
        self.residual.append(out[0] if isinstance(out, tuple) else out)

    def close_batch(self) -> None:
        """Block influence of the batch from the residual states h_0 .. h_L it kept."""
        h, n = self.residual, self.window

        def cos(a: Tensor, b: Tensor) -> Tensor:  # (B, T, h) x 2 -> summed over the records
            similarity = torch.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, T)
            return self._record_means(similarity).double().sum().cpu()

        for i in range(self.layers):
            self.cos_layer[i] += cos(h[i], h[i + 1])
        for i in range(self.layers - n + 1):
            self.cos_block[i] += cos(h[i], h[i + n])
        self.records += self.mask.shape[0]
        self.residual = []

    def result(self) -> Importance:
        g, p, d = self.groups, self.per, self.d
        root = lambda t: t.sqrt().float()  # noqa: E731
        q = root(self.q).unflatten(1, (g, p)).sum(2)  # (L, g, d/2)
        return Importance(
            hidden=root(self.norms).sum(0),
            neurons=list(root(self.neurons)),
            heads=list(root(self.heads).unflatten(1, (g, p))),
            qk_pairs=list(q * root(self.k)),
            v_dims=list(root(self.v).unflatten(1, (g, p)).sum(2)),
            layers=(1 - self.cos_layer / self.records).float(),
            blocks=(1 - self.cos_block / self.records).float())


@torch.inference_mode()
def from_activations(model, batches: list[dict], window: int, progress: bool = True) -> Importance:
    """Scores from forward passes of `model` over `batches` (dicts of input_ids and
    attention_mask, (B, T), right-padded). `window`: how many contiguous layers the target drops
    (blocks are scored for that length; 1 when none is dropped)."""
    from tqdm.auto import tqdm

    recorder = _Recorder(model, window)
    device = next(model.parameters()).device
    try:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=not progress):
            recorder.mask = batch["attention_mask"].to(device).float()
            model.model(input_ids=batch["input_ids"].to(device),
                        attention_mask=batch["attention_mask"].to(device), use_cache=False)
            recorder.close_batch()
    finally:
        recorder.remove()
    return recorder.result()


# ---------------------------------------------------------------------------------------------
# Baselines: weight norms and a seeded draw


def _norm2(w: Tensor, dim: int) -> Tensor:
    """Sum of squares over `dim`, in fp32."""
    return w.float().pow(2).sum(dim)


def _blocks(layers: Tensor, window: int) -> Tensor:
    """A run of `window` layers scores the sum of its layers' scores."""
    return layers.unfold(0, window, 1).sum(1)


@torch.no_grad()
def from_weights(model, window: int) -> Importance:
    """Scores from weight norms: a unit scores the L2 norm of every weight that reads or writes
    it (e.g. a neuron: its rows of gate_proj and up_proj and its column of down_proj); a layer
    the norm of what it writes into the residual stream (o_proj and down_proj)."""
    L, g, p, d = _geometry(model.config)
    decoder = model.model
    hidden = _norm2(decoder.embed_tokens.weight, 0)
    if not model.config.tie_word_embeddings:
        hidden += _norm2(model.lm_head.weight, 0)
    neurons, heads, qk_pairs, v_dims, layers = [], [], [], [], []
    for layer in decoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for reader in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            hidden += _norm2(reader.weight, 0)
        for writer in (attn.o_proj, mlp.down_proj):
            hidden += _norm2(writer.weight, 1)
        neurons.append((_norm2(mlp.gate_proj.weight, 1) + _norm2(mlp.up_proj.weight, 1)
                        + _norm2(mlp.down_proj.weight, 0)).sqrt())
        q = _norm2(attn.q_proj.weight, 1).view(g, p, d)  # (g, p, d) per output channel
        o = _norm2(attn.o_proj.weight, 0).view(g, p, d)
        k = _norm2(attn.k_proj.weight, 1).view(g, d)
        v = _norm2(attn.v_proj.weight, 1).view(g, d)
        heads.append((q + o).sum(-1).sqrt())
        pair = lambda x: (x[..., : d // 2] + x[..., d // 2:]).sqrt()  # noqa: E731
        qk_pairs.append(pair(q).sum(1) * pair(k))
        v_dims.append((v + o.sum(1)).sqrt())
        layers.append((_norm2(attn.o_proj.weight, (0, 1)) + _norm2(mlp.down_proj.weight, (0, 1))).sqrt())
    layers = torch.stack(layers)
    return Importance(hidden=hidden.sqrt(), neurons=neurons, heads=heads, qk_pairs=qk_pairs,
                      v_dims=v_dims, layers=layers, blocks=_blocks(layers, window))


def from_seed(config, window: int, seed: int) -> Importance:
    """Uniform random scores from torch.Generator(seed): the same seed, the same choice."""
    L, g, p, d = _geometry(config)
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    layers = draw(L)
    return Importance(hidden=draw(config.hidden_size),
                      neurons=[draw(config.intermediate_size) for _ in range(L)],
                      heads=[draw(g, p) for _ in range(L)], qk_pairs=[draw(g, d // 2) for _ in range(L)],
                      v_dims=[draw(g, d) for _ in range(L)], layers=layers,
                      blocks=_blocks(layers, window))
