"""Fused projections: q/k/v and gate/up weights concatenated into one matrix each, as vLLM's
QKVParallelLinear / MergedColumnParallelLinear do. A decode step then reads each layer's input
projections in one matmul instead of three (attention) and two (MLP): same bytes, fewer and
larger kernels. The math is unchanged; `split` in `models.llama` undoes the concatenation."""

from __future__ import annotations

import dataclasses

from kvjax.native.weights import concatenate

from .config import LlamaConfig

_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


def fuse_projections(params: dict, config: LlamaConfig) -> tuple[dict, LlamaConfig]:
    """{'params': {'layers_i': {'self_attn': {'q_proj': {'kernel': [D, Nq*H]}, ...}}}} ->
    the same tree with 'qkv_proj' [D, (Nq + 2 Nkv) H] (and bias) and 'gate_up_proj' [D, 2 I],
    and `config` with fused_projections=True. A fused input is returned as it is."""
    if config.fused_projections:
        return params, config
    tree = dict(params["params"])
    for i in range(config.num_layers):
        layer = dict(tree[f"layers_{i}"])
        for module, fused, parts in _GROUPS:
            sub = dict(layer[module])
            missing = [p for p in parts if p not in sub]
            if missing:
                raise ValueError(f"layers_{i}.{module} lacks {missing}; expected unfused projections {parts}")
            pieces = [sub.pop(p) for p in parts]
            # kernels [D, N_i] (or QuantizedWeights carrying GGUF blocks) and biases [N_i] along N
            sub[fused] = {k: concatenate([p[k] for p in pieces], axis=-1) for k in pieces[0]}
            layer[module] = sub
        tree[f"layers_{i}"] = layer
    return {**params, "params": tree}, dataclasses.replace(config, fused_projections=True)
