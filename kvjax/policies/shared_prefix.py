"""A two-level KV state: one prefix shared by every row, plus each row's own slots.

B requests that start with the same P tokens need the prefix's K/V once, not B times
(BatchLLM's prefix-sharing groups, APE's shared prefix, many questions about one document).
`SharedPrefixKV` holds the prefix as a one-row slot cache [1, N, P, H] and the rows' own
tokens as [B, N, S, H]. Attention (`shared_prefix_attend`) runs twice and merges through the
log-sum-exps:

    prefix part: the B*T queries as ONE row against the prefix  -> reads the prefix once
    row part:    each row's queries against its own slots
    out = (e^lse_p * out_p + e^lse_r * out_r) / (e^lse_p + e^lse_r)

which is exact softmax attention over the concatenation (positions decide visibility, so the
prefix needs no mask). This is the jnp/XLA reference path through `attention.attend`; a
fused GPU cascade kernel (both parts in one launch) is not implemented.

`SharedPrefix()` is the policy that prefills and decodes on such a state (rows append like
the dense cache). It is not a compression method and is not registered: build its state with
`shared_prefix_state` from a one-row dense prefix state.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from flax import struct

from .. import attention
from ..state import KVState, LayerContext, SlotKV, used_nbytes
from . import slots
from .base import Policy, PolicyError


@struct.dataclass
class SharedPrefixKV:
    """prefix: SlotKV [1, N, P, H] read by every row; rows: SlotKV [B, N, S, H] (each row's
    own tokens, appended after the prefix's positions)."""

    prefix: SlotKV
    rows: SlotKV

    def nbytes_used(self) -> int:
        """The prefix once plus the rows' filled slots."""
        return used_nbytes(self.prefix) + used_nbytes(self.rows)


def shared_prefix_attend(
    q, q_pos, prefix: SlotKV, rows: SlotKV, *, window=None, implementation=None
) -> attention.AttentionOutput:
    """Attention of q [B, T, Nq, H] (positions q_pos [B, T]) over prefix [1, N, P, H] + rows
    [B, N, S, H], merged through the log-sum-exps (module doc). Returns AttentionOutput(out,
    lse) equal to `attention.attend` over each row's concatenated slots."""
    b, t, nq, h = q.shape
    if prefix.k.shape[0] != 1:
        raise ValueError(f"the shared prefix must have one row; got {prefix.k.shape[0]}")
    pre = attention.attend(
        q.reshape(1, b * t, nq, h),
        prefix.k,
        prefix.v,
        q_pos.reshape(1, b * t),
        prefix.pos,
        window=window,
        implementation=implementation,
    )
    own = attention.attend(q, rows.k, rows.v, q_pos, rows.pos, window=window, implementation=implementation)
    out, lse = attention.merge_partials([pre.out.reshape(b, t, nq, h), own.out], [pre.lse.reshape(b, t, nq), own.lse])
    return attention.AttentionOutput(out, lse)


@dataclasses.dataclass(frozen=True)
class SharedPrefix(Policy):
    """Prefill and decode on a `SharedPrefixKV`: new tokens go to each row's own slots;
    attention reads the prefix once per step (`shared_prefix_attend`)."""

    name = "shared_prefix"
    #: decode appends T tokens like the dense cache (padding included): see generation.resume
    appends_like_dense: ClassVar[bool] = True

    def _step(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, SharedPrefixKV):
            raise PolicyError(
                f"shared_prefix runs on a SharedPrefixKV state (kvjax.policies.shared_prefix.shared_prefix_state); "
                f"got {type(state).__name__}"
            )
        own = slots.append(state.rows, k, v, q_pos)
        res = shared_prefix_attend(
            q, q_pos, state.prefix, own, window=ctx.config.sliding_window, implementation=ctx.implementation
        )
        return SharedPrefixKV(state.prefix, own), res.out

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        return self._step(state, q, k, v, q_pos, ctx)

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        return self._step(state, q, k, v, q_pos, ctx)

    def truncate_layer(self, layer, lengths):
        """Roll the rows back (the prefix is shared and never dropped)."""
        return layer.replace(rows=slots.truncate_slots(layer.rows, lengths))


def shared_prefix_state(prefix: KVState, batch: int, capacity: int) -> KVState:
    """A `SharedPrefixKV` state for `batch` rows over a one-row state `prefix` whose layers are
    slot caches (a dense prefill), with `capacity` empty slots per row for the rows' own tokens
    (their prompt suffixes and generated tokens). Every row starts at the prefix's length."""
    if prefix.lengths.shape[0] != 1:
        raise ValueError(f"the prefix state must have one row; got {prefix.lengths.shape[0]}")
    layers = []
    for i, layer in enumerate(prefix.layers):
        if not isinstance(layer, SlotKV):
            raise ValueError(f"the prefix state's layers must be slot caches (SlotKV); layer {i} is {type(layer)}")
        _, n, _, h = layer.k.shape
        rows = SlotKV.empty(batch, n, capacity, h, layer.k.dtype)
        layers.append(SharedPrefixKV(layer, rows))
    lengths = jnp.broadcast_to(prefix.lengths, (batch,)).astype(jnp.int32)
    return KVState(layers=tuple(layers), lengths=lengths)


def flat_rows(state: KVState) -> KVState:
    """The equivalent flat state: each row's slots = the prefix's followed by its own
    ([B, N, P + S, H] slot caches), e.g. to compare with `attention.attend` or to hand the
    rows to a policy that needs one cache per row."""
    layers = []
    for layer in state.layers:
        b = layer.rows.k.shape[0]

        def cat(p, r):
            return jnp.concatenate([jnp.repeat(p, b, axis=0), r], axis=2)

        pre, own = layer.prefix, layer.rows
        fill = pre.capacity + jnp.asarray(own.fill, jnp.int32)
        layers.append(SlotKV(cat(pre.k, own.k), cat(pre.v, own.v), cat(pre.pos, own.pos), fill))
    return KVState(layers=tuple(layers), lengths=state.lengths)


__all__ = ["SharedPrefix", "SharedPrefixKV", "flat_rows", "shared_prefix_attend", "shared_prefix_state"]
