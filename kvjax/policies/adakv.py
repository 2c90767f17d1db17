"""AdaKV: head-wise adaptive budgets with real per-head storage.

Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
Efficient LLM Inference" (2024), arXiv:2407.11550. SnapKV scores are compared across all
KV heads of a layer: the layer keeps its total budget (N * floor(budget * length)) as the
best slots of any head, each head keeping at least `safeguard` of its even share. Kept
slots of all heads live in one flat pool per layer (k, v [B, P, H], head id per slot), so
a head that needs more context really holds more and one that needs less holds less.

Per row (true length L): each head's even share is SnapKV's count, min(L, max(floor(budget
* L), window)), so a row no longer than the window is kept whole; the pool holds that share
for the batch's bound on true lengths times the KV heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from .. import attention
from ..state import LayerContext, leaves_nbytes, slot_bytes_used
from . import slots
from .base import PolicyError
from .registry import register
from .snapkv import SnapKV


@struct.dataclass
class PooledKV:
    """k, v [B, P, H]; pos [B, P] (-1 empty); head [B, P] int32 (owning KV head); fill."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    head: jax.Array
    fill: jax.Array

    def nbytes_used(self) -> int:
        """Bytes of the pool slots that hold a token: K, V, position and head id."""
        return slot_bytes_used(self.pos >= 0, [self.k, self.v, self.pos, self.head], [self.fill])

    def nbytes_read_per_step(self) -> int:
        """Bytes one decode step reads: the whole pool (every head attends over it, masked by
        the owning-head ids)."""
        return leaves_nbytes(self)


def pooled_attend(st: PooledKV, q, q_pos, num_kv_heads: int, ctx: LayerContext):
    """Attention over the pool: each KV head sees only its own slots."""
    b, p, h = st.k.shape
    heads = jnp.arange(num_kv_heads, dtype=jnp.int32)[None, :, None]
    k = jnp.broadcast_to(st.k[:, None], (b, num_kv_heads, p, h))
    v = jnp.broadcast_to(st.v[:, None], (b, num_kv_heads, p, h))
    pos = jnp.where(st.head[:, None, :] == heads, st.pos[:, None, :], -1)
    return attention.attend(q, k, v, q_pos, pos, window=ctx.config.sliding_window, implementation=ctx.implementation)


@register
@dataclasses.dataclass(frozen=True)
class AdaKV(SnapKV):
    """budget: fraction kept (layer total); window, kernel: SnapKV scoring; safeguard:
    minimum fraction of its even share every head keeps (kvpress's alpha_safeguard)."""

    name = "adakv"
    #: the pool is not a per-head slot cache, so no quantizer or other store can follow
    feeds_stores = False
    budget: float = 0.2
    window: int = 64
    kernel: int = 5
    safeguard: float = 0.2

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.safeguard <= 1.0:
            raise PolicyError(f"safeguard={self.safeguard} must be in [0, 1]")

    def compress(self, state, ctx, *, q=None, q_pos=None, res=None):
        b, n, s = state.pos.shape
        lengths = slots.row_lengths(state.pos)
        scores = jnp.where(state.pos >= 0, self.scores(state, q, q_pos, res, ctx), -jnp.inf)
        per_head = self.keep_counts(lengths, ctx)  # [B]
        n_safe = jnp.maximum(1, jnp.floor(per_head * self.safeguard)).astype(jnp.int32)
        # Safeguard: every head's n_safe best slots are lifted above everything else.
        rank = jnp.argsort(jnp.argsort(-scores, axis=2), axis=2)
        lifted = jnp.where((rank < n_safe[:, None, None]) & (state.pos >= 0), jnp.inf, scores)
        cap = min(self.capacity(ctx.prompt_bound, ctx), s) * n  # static pool size
        flat = lifted.reshape(b, n * s)
        _, idx = jax.lax.top_k(flat, cap)  # [B, P]
        total = per_head * n
        valid = (jnp.arange(cap)[None] < total[:, None]) & (jnp.take_along_axis(flat, idx, 1) > -jnp.inf)
        head, slot = idx // s, idx % s
        k = state.k[jnp.arange(b)[:, None], head, slot]
        v = state.v[jnp.arange(b)[:, None], head, slot]
        pos = jnp.where(valid, state.pos[jnp.arange(b)[:, None], head, slot], -1)
        extra = ctx.max_new_tokens * n  # decode appends one slot per head per token
        pad = ((0, 0), (0, extra), (0, 0))
        return PooledKV(
            jnp.pad(k, pad),
            jnp.pad(v, pad),
            jnp.pad(pos, ((0, 0), (0, extra)), constant_values=-1),
            jnp.pad(head.astype(jnp.int32), ((0, 0), (0, extra))),
            jnp.asarray(cap, jnp.int32),
        )

    def decode(self, state, q, k, v, q_pos, ctx):
        if not isinstance(state, PooledKV):
            raise PolicyError("adakv decodes on its pooled state; prefill the prompt first")
        b, t, n, h = k.shape
        kk = k.reshape(b, t * n, h).astype(state.k.dtype)
        vv = v.reshape(b, t * n, h).astype(state.v.dtype)
        pp = jnp.repeat(q_pos, n, axis=1).astype(jnp.int32)
        hh = jnp.broadcast_to(jnp.tile(jnp.arange(n, dtype=jnp.int32), t)[None], (b, t * n))
        st = state.replace(  # at `fill`, per row when it is [B] (after a rollback)
            k=slots.write_rows(state.k, kk, state.fill, axis=1),
            v=slots.write_rows(state.v, vv, state.fill, axis=1),
            pos=slots.write_rows(state.pos, pp, state.fill, axis=1),
            head=slots.write_rows(state.head, hh, state.fill, axis=1),
            fill=state.fill + t * n,
        )
        return st, pooled_attend(st, q, q_pos, n, ctx).out

    def truncate_layer(self, layer, lengths):
        """Pool slots at positions >= lengths[b] emptied; row b's offset back to its first
        emptied slot (decode appends in position order)."""
        if not isinstance(layer, PooledKV):
            return super().truncate_layer(layer, lengths)
        b, p = layer.pos.shape
        drop = layer.pos >= lengths[:, None]
        slot = jnp.arange(p, dtype=jnp.int32)
        first_drop = jnp.min(jnp.where(drop, slot, p), axis=1)
        after_kept = jnp.max(jnp.where((layer.pos >= 0) & ~drop, slot + 1, 0), axis=1)
        fill = jnp.minimum(jnp.broadcast_to(layer.fill, (b,)), jnp.maximum(first_drop, after_kept))
        return layer.replace(
            k=jnp.where(drop[..., None], jnp.zeros((), layer.k.dtype), layer.k),
            v=jnp.where(drop[..., None], jnp.zeros((), layer.v.dtype), layer.v),
            pos=jnp.where(drop, -1, layer.pos),
            head=jnp.where(drop, 0, layer.head),
            fill=fill.astype(jnp.int32),
        )
