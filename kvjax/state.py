"""KV-state pytrees.

`SlotKV` is the storage most policies share: K/V slots per KV head plus the absolute
position each slot holds (-1 = empty). `KVState` is the whole-model state: one layer
state per layer (each policy picks its own type and capacity, so per-layer budgets
give per-layer shapes) plus the per-row token count. Every field is an array, so the
state passes through `jit`, `lax.while_loop`, `donate_argnums`, sharding and orbax as is.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import struct

from .models.config import LlamaConfig


@struct.dataclass
class SlotKV:
    """k, v [B, N, S, H]; pos [B, N, S] int32 (-1 = empty); fill: next slot to append to."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    fill: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @classmethod
    def empty(cls, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype) -> SlotKV:
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(
            k=jnp.zeros(shape, dtype),
            v=jnp.zeros(shape, dtype),
            pos=jnp.full(shape[:3], -1, jnp.int32),
            fill=jnp.zeros((), jnp.int32),
        )


@struct.dataclass
class KVState:
    """layers: tuple of per-layer states; lengths [B] int32: tokens consumed per row
    (= the position the next token of that row gets)."""

    layers: tuple
    lengths: jax.Array

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache arrays (codes, scales, positions, extras), all layers."""
        return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.layers)))

    def dense_nbytes(self, config: LlamaConfig, dtype=None) -> int:
        """Bytes a dense cache of the same dtype would need for max(lengths) tokens per row."""
        dtype = dtype or _kv_dtype(self.layers)
        tokens = int(jnp.max(self.lengths)) * int(self.lengths.shape[0])
        return tokens * config.kv_bytes_per_token(jnp.dtype(dtype).itemsize)

    def compression_ratio(self, config: LlamaConfig, dtype=None) -> float:
        """nbytes / dense_nbytes: 1.0 for a dense cache holding exactly the tokens seen."""
        return self.nbytes / max(1, self.dense_nbytes(config, dtype))


def _kv_dtype(layers) -> Any:
    """The full-precision K dtype: a slot cache's `k`, a quantized cache's residual window
    `res_k` (its first floating leaf can be a lower-precision scale), else the first
    floating leaf."""
    for layer in layers:
        for name in ("k", "res_k"):
            x = getattr(layer, name, None)
            if x is not None and jnp.issubdtype(x.dtype, jnp.floating):
                return x.dtype
    for leaf in jax.tree_util.tree_leaves(layers):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.dtype
    return jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Static facts a policy sees for one layer call.

    phase: "prefill" (a prompt chunk of T tokens) or "decode" (T new tokens, usually 1).
    final: this prefill chunk ends the prompt (eviction policies compress then).
    prompt_len: the static (bucketed) prompt length; max_new_tokens: decode headroom the
    state must keep after compression.
    """

    layer: int
    config: LlamaConfig
    phase: Literal["prefill", "decode"] = "prefill"
    final: bool = True
    prompt_len: int = 0
    max_new_tokens: int = 0
    implementation: str | None = None
