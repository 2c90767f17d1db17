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
    """k, v [B, N, S, H]; pos [B, N, S] int32 (-1 = empty); fill: next slot to append to, a
    scalar (every row, what a prefill makes) or [B] int32 (per row: after a rollback or a row
    reset, `kvjax.policies.rows`)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    fill: jax.Array

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def nbytes_used(self) -> int:
        """Bytes of the slots that hold a token (pos >= 0): their K, V and position."""
        return slot_bytes_used(self.pos >= 0, [self.k, self.v, self.pos], [self.fill])

    def nbytes_read_per_step(self) -> int:
        """Bytes one decode step reads: every slot's K, V and position (the decode attention
        visits every slot block and masks by position; empty headroom slots included)."""
        return leaves_nbytes(self)

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
    (= the position the next token of that row gets).

    Bytes, all layers (python ints, read from the concrete arrays; see docs/memory.md):

    - `kv_bytes_held`: every leaf of every layer state (codes, scales, positions, scores,
      residual windows, extras): what the cache occupies.
    - `kv_bytes_used`: the part of it that holds a token: each slot that holds one, at its
      storage cost (K, V, position and per-slot extras; quantized tokens at their code and
      scale cost), plus per-row/per-head bookkeeping.
    - `kv_bytes_headroom`: held - used: empty slots (room for decode tokens, static shapes
      rounded up, rows shorter than the batch's longest, evicted slots).
    - `dense_bytes_of_seen(config)`: what a dense K+V cache of exactly the tokens each row
      has seen (sum of `lengths`) needs, in the cache's full-precision dtype, no headroom.
    - `kv_bytes_read_per_step`: what one decode step reads of the cache (one new token per
      row): each layer state type reports it through `nbytes_read_per_step()` (a dense or
      evicted slot cache and the quantized caches read every leaf; Quest reads its page
      metadata and the selected pages, A^2ATS its codes and the selected tokens). Computed
      from static shapes alone (works on `jax.eval_shape` results), so `kvjax.analysis` uses it
      for the decode step time.
    """

    layers: tuple
    lengths: jax.Array

    @property
    def kv_bytes_held(self) -> int:
        """Bytes of every leaf of the layer states (see class doc)."""
        return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(self.layers)))

    @property
    def nbytes(self) -> int:
        """Same as `kv_bytes_held`."""
        return self.kv_bytes_held

    @property
    def kv_bytes_used(self) -> int:
        """Bytes of the slots that hold a token, at their storage cost (see class doc). A layer
        state type reports its own through `nbytes_used()`; one without it counts as all used."""
        return int(sum(used_nbytes(layer) for layer in self.layers))

    @property
    def kv_bytes_headroom(self) -> int:
        """kv_bytes_held - kv_bytes_used: bytes of slots that hold no token."""
        return self.kv_bytes_held - self.kv_bytes_used

    def dense_bytes_of_seen(self, config: LlamaConfig, dtype=None) -> int:
        """Bytes a dense K+V cache (no positions, no headroom) needs for the tokens every row
        has seen: sum(lengths) tokens x `config.kv_bytes_per_token` in `dtype` (default: the
        cache's full-precision dtype)."""
        dtype = dtype or _kv_dtype(self.layers)
        tokens = int(jnp.sum(self.lengths))
        return tokens * config.kv_bytes_per_token(jnp.dtype(dtype).itemsize)

    def dense_nbytes(self, config: LlamaConfig, dtype=None) -> int:
        """Same as `dense_bytes_of_seen`."""
        return self.dense_bytes_of_seen(config, dtype)

    def compression_ratio(self, config: LlamaConfig, dtype=None) -> float:
        """kv_bytes_held / dense_bytes_of_seen: 1.0 for a dense cache holding exactly the tokens
        seen (positions and headroom make a real dense cache hold a little more)."""
        return self.kv_bytes_held / max(1, self.dense_bytes_of_seen(config, dtype))

    @property
    def kv_bytes_read_per_step(self) -> int:
        """Bytes one decode step reads of the cache, all layers (see class doc)."""
        return int(sum(read_nbytes(layer) for layer in self.layers))

    def byte_stats(self, config: LlamaConfig, dtype=None) -> dict:
        """{kv_bytes_held, kv_bytes_used, kv_bytes_headroom, kv_bytes_read_per_step,
        dense_bytes_of_seen, device_bytes, host_bytes, host_bytes_read_per_step} (see class doc
        and the properties of the last three)."""
        held, used = self.kv_bytes_held, self.kv_bytes_used
        host = self.host_bytes
        return {
            "kv_bytes_held": held,
            "kv_bytes_used": used,
            "kv_bytes_headroom": held - used,
            "kv_bytes_read_per_step": self.kv_bytes_read_per_step,
            "dense_bytes_of_seen": self.dense_bytes_of_seen(config, dtype),
            "device_bytes": held - host,
            "host_bytes": host,
            "host_bytes_read_per_step": self.host_bytes_read_per_step,
        }

    @property
    def host_bytes(self) -> int:
        """Bytes of the leaves kept in host memory (`kvjax.host`), all layers: each layer state
        type that offloads reports them through `nbytes_host()` (from shapes and its static
        placement, so `jax.eval_shape` results work too); 0 for the others."""
        return int(sum(host_nbytes(layer) for layer in self.layers))

    @property
    def device_bytes(self) -> int:
        """kv_bytes_held - host_bytes: what the cache occupies in device memory."""
        return self.kv_bytes_held - self.host_bytes

    @property
    def host_bytes_read_per_step(self) -> int:
        """Bytes one decode step copies from host memory to the device (the host link's traffic
        per step, part of `kv_bytes_read_per_step`): `nbytes_host_read_per_step()` per layer."""
        return int(sum(_call_or_zero(layer, "nbytes_host_read_per_step") for layer in self.layers))


def used_nbytes(layer) -> int:
    """Bytes of a layer state that hold tokens: `layer.nbytes_used()` where the state type
    defines it, else all of its leaves."""
    fn = getattr(layer, "nbytes_used", None)
    if fn is not None:
        return int(fn())
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(layer)))


def leaf_nbytes(x) -> int:
    """Bytes of one array or `jax.ShapeDtypeStruct` (size x itemsize: shapes alone)."""
    return int(x.size) * jnp.dtype(x.dtype).itemsize


def leaves_nbytes(tree) -> int:
    """Bytes of every leaf of a pytree (arrays or `jax.ShapeDtypeStruct`s)."""
    return int(sum(leaf_nbytes(x) for x in jax.tree_util.tree_leaves(tree)))


def read_nbytes(layer) -> int:
    """Bytes one decode step reads of a layer state: `layer.nbytes_read_per_step()` where the
    state type defines it, else all of its leaves."""
    fn = getattr(layer, "nbytes_read_per_step", None)
    if fn is not None:
        return int(fn())
    return leaves_nbytes(layer)


def slot_bytes_used(valid: jax.Array, per_slot: list, fixed: list = ()) -> int:
    """Bytes of the filled slots: `valid` [..., S] bool marks them; `per_slot` arrays have the
    same leading [..., S] axes (any trailing ones) and cost their bytes per slot; `fixed`
    arrays (counters, per-row limits) count whole."""
    n_valid = int(jnp.sum(valid))
    total = valid.size
    used = sum(x.nbytes * n_valid // max(total, 1) for x in per_slot)
    return int(used + sum(x.nbytes for x in fixed))


def _call_or_zero(layer, name: str) -> int:
    fn = getattr(layer, name, None)
    return int(fn()) if fn is not None else 0


def host_nbytes(layer) -> int:
    """Bytes of a layer state kept in host memory: `layer.nbytes_host()` where defined, else 0."""
    return _call_or_zero(layer, "nbytes_host")


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


#: Steps per power of two of `bound_length`: the static bound exceeds the longest row by
#: less than width / BOUND_STEPS tokens.
BOUND_STEPS = 8


def bound_length(longest: int, width: int) -> int:
    """Static bound on a batch's true prompt lengths, finer than the prompt bucket `width`:
    `longest` (the longest row's true length) rounded up to a multiple of width / BOUND_STEPS
    (at least 1), at most `width`. E.g. 633 tokens in a 1024 bucket -> 640; 11 in 32 -> 12.

    Compressed states are sized from it (`LayerContext.prompt_bound`), so a batch holds what
    its longest row needs rather than what the bucket could; each bound value is one more
    static shape (at most BOUND_STEPS per bucket)."""
    if not (isinstance(longest, int) and isinstance(width, int) and 1 <= longest <= width):
        raise ValueError(f"longest={longest!r} must be an integer in [1, width={width!r}]")
    step = max(1, width // BOUND_STEPS)
    return min(width, -(-longest // step) * step)


@dataclasses.dataclass(frozen=True)
class LayerContext:
    """Static facts a policy sees for one layer call.

    phase: "prefill" (a prompt chunk of T tokens) or "decode" (T new tokens, usually 1).
    final: this prefill chunk ends the prompt (eviction policies compress then).
    prompt_len: the static (bucketed) prompt length; max_new_tokens: decode headroom the
    state must keep after compression.
    longest: a static bound on every row's true prompt length (`bound_length`; 0 = none given,
    use prompt_len). Prompt tokens sit at positions < longest, so the slots a prefill appended
    beyond it hold only padding; compressed states are sized from it (`prompt_bound`).
    prefix_cache: the caller guarantees that this prefill call's queries sit at positions
    0..T-1 (-1 = padding) of an empty cache the policy appends them to in order, so its slots
    hold positions 0..len-1 (a whole prompt in one call). Attention kernels then skip their
    on-device layout check and the reference fallback that check needs (`attention.attend`).
    new_turn: this decode call appends a new question (a new turn of a session,
    `kvjax.Session.ask`): retrieval policies (`offload`) choose what to fetch for it from its
    tokens. Decode steps that continue a turn (answer tokens, appended history) leave it False.
    """

    layer: int
    config: LlamaConfig
    phase: Literal["prefill", "decode"] = "prefill"
    final: bool = True
    prompt_len: int = 0
    max_new_tokens: int = 0
    implementation: str | None = None
    longest: int = 0
    prefix_cache: bool = False
    new_turn: bool = False
    deferred: bool = False

    @property
    def prompt_bound(self) -> int:
        """The static bound on the true prompt lengths: `longest` if given, else prompt_len."""
        if self.longest and self.prompt_len:
            return min(self.longest, self.prompt_len)
        return self.longest or self.prompt_len
