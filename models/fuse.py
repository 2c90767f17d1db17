"""Fused projections: q/k/v and gate/up weights concatenated into one matrix each, as vLLM's
QKVParallelLinear / MergedColumnParallelLinear do. A decode step then reads each layer's input
projections in one matmul instead of three (attention) and two (MLP): same bytes, fewer and
larger kernels. The math is unchanged; `split_groups` in `models.llama` undoes the concatenation.

With `groups` > 1 the columns are laid out in groups of whole heads (and MLP columns):
[q_0 k_0 v_0 | q_1 k_1 v_1 | ...], part p's group g being its g-th contiguous block. Sharding
the fused matrix's columns over `groups` tensor-parallel shards then gives each shard exactly
the fused projection of its own heads, as Megatron-LM lays out its fused QKV weight.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kvjax.native.weights import QuantizedWeight

from .config import LlamaConfig
from .llama import split_groups

_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def _interleave(arrays, axis: int, groups: int):
    """Arrays cut into `groups` equal blocks along `axis`, laid out group by group."""
    if groups == 1:
        return jnp.concatenate(arrays, axis=axis)
    axis = axis % arrays[0].ndim
    cut = [jnp.split(a, groups, axis=axis) for a in arrays]
    return jnp.concatenate([c[g] for g in range(groups) for c in cut], axis=axis)


def _fuse(leaves, groups: int):
    """Kernels [D, N_i] (or QuantizedWeights, blocks [N_i, bytes]) or biases [N_i] along N."""
    floats = [w.weight if isinstance(w, QuantizedWeight) else w for w in leaves]
    out = _interleave(floats, -1, groups)
    kinds = {w.block_type if isinstance(w, QuantizedWeight) else None for w in leaves}
    if len(kinds) != 1 or None in kinds:
        return out
    return QuantizedWeight(out, _interleave([w.blocks for w in leaves], 0, groups), kinds.pop())


def _unfuse(leaf, sizes, groups: int):
    """Inverse of `_fuse`: the parts of a fused kernel / bias (N-axis sizes `sizes`)."""
    if isinstance(leaf, QuantizedWeight):
        ws = split_groups(leaf.weight, sizes, groups)
        bs = [b.T for b in split_groups(leaf.blocks.T, sizes, groups)]
        return [QuantizedWeight(w, b, leaf.block_type) for w, b in zip(ws, bs)]
    return split_groups(leaf, sizes, groups)


def fuse_projections(params: dict, config: LlamaConfig, groups: int = 1) -> tuple[dict, LlamaConfig]:
    """{'params': {'layers_i': {'self_attn': {'q_proj': {'kernel': [D, Nq*H]}, ...}}}} ->
    the same tree with 'qkv_proj' [D, (Nq + 2 Nkv) H] (and bias) and 'gate_up_proj' [D, 2 I]
    laid out in `groups` groups (module doc), and `config` with fused_projections=True and
    fused_groups=groups. A fused input is regrouped when its groups differ, else returned as is."""
    if config.fused_projections:
        if config.fused_groups == groups:
            return params, config
        params, config = unfuse_projections(params, config)
    dataclasses.replace(config, fused_projections=True, fused_groups=groups)  # checks the sizes divide
    tree = dict(params["params"])
    for i in range(config.num_layers):
        layer = dict(tree[f"layers_{i}"])
        for module, fused, parts in _GROUPS:
            sub = dict(layer[module])
            missing = [p for p in parts if p not in sub]
            if missing:
                raise ValueError(f"layers_{i}.{module} lacks {missing}; expected unfused projections {parts}")
            pieces = [sub.pop(p) for p in parts]
            sub[fused] = {k: _fuse([p[k] for p in pieces], groups) for k in pieces[0]}
            layer[module] = sub
        tree[f"layers_{i}"] = layer
    return {**params, "params": tree}, dataclasses.replace(config, fused_projections=True, fused_groups=groups)


def unfuse_projections(params: dict, config: LlamaConfig) -> tuple[dict, LlamaConfig]:
    """Inverse of `fuse_projections`: separate q/k/v and gate/up again (an unfused input is
    returned as is)."""
    if not config.fused_projections:
        return params, config
    c = config
    sizes = {
        "qkv_proj": (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim),
        "gate_up_proj": (c.intermediate_size, c.intermediate_size),
    }
    tree = dict(params["params"])
    for i in range(c.num_layers):
        layer = dict(tree[f"layers_{i}"])
        for module, fused, parts in _GROUPS:
            sub = dict(layer[module])
            whole = sub.pop(fused)
            split = {k: _unfuse(v, sizes[fused], c.fused_groups) for k, v in whole.items()}
            for j, p in enumerate(parts):
                sub[p] = {k: v[j] for k, v in split.items()}
            layer[module] = sub
        tree[f"layers_{i}"] = layer
    return {**params, "params": tree}, dataclasses.replace(c, fused_projections=False, fused_groups=1)
