"""Elastic Cache: importance-driven merging of the KV cache onto anchor tokens.

Liu et al., "Efficient Inference of Vision Instruction-Following Models with Elastic
Cache" (ECCV 2024), arXiv:2407.18121 (code: github.com/liuzuyan/ElasticCache).

Instruction encoding (prefill): a token's importance is its attention *frequency*, the
attention it receives from every prompt query, averaged over all query heads (one score
per layer, shared by the KV heads; accumulated over prefill chunks). The first `sink`
tokens, the last prompt token and the most important ones up to floor(budget * length)
become anchors; every other token is merged into the anchor nearest to it in position
(ties: the older anchor): the anchor's K and V become the mean of its own and its merged
tokens' (the authors' `scatter_reduce(..., "mean")`). The new state holds only the
anchors: a smaller `SlotKV`, not a mask.

Output generation (decode): tokens are prioritised by their distance from the newest token
with an offset: the `offset` most recent tokens and the sinks stay as they are; when the
cache exceeds its size, the token at the truncation point (the newest one older than
those `offset`) is merged into its nearest neighbour by position. The cache keeps its
prompt-time size (one spare slot receives each new token). Slot weights (how many original
tokens a slot averages) are kept in `ScoredKV.score`, so every merge is an exact running
mean. (The authors' code drops the truncated token and lets the cache grow to the same
ratio of all tokens seen; kvjax keeps the size fixed, as its other decode-time evicting
policies do, and merges instead of dropping, per the paper's merging principle.)

A step chooses its merge after attention and leaves it pending (`ElasticKV`: truncated slot,
anchor, whether to merge, [B, N] each); the next step, or `maintain`, applies it before writing
and attending (lazy eviction, `kvjax.policies.eviction`): attention sees the merged cache, and
no step writes K, V or positions after attention has read them, so the compiled decode loop
updates them in place.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from ..state import LayerContext, SlotKV
from . import slots
from .base import PolicyError, check_positive
from .eviction import EvictingKV, EvictionPolicy, ScoredKV
from .registry import register


def position_order(pos: jax.Array) -> jax.Array:
    """Slot indices [B, N, S] sorted by position (empty slots last)."""
    return jnp.argsort(jnp.where(pos >= 0, pos, jnp.iinfo(jnp.int32).max), axis=2)


def take(x: jax.Array, idx: jax.Array) -> jax.Array:
    """x [B, N, S, ...] gathered along the slot axis with idx [B, N, K]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, idx, axis=2)


def merge_onto(kv: SlotKV, target: jax.Array, weight: jax.Array):
    """Weighted merge of slots onto target slots.

    kv: k, v [B, N, S, H]; target [B, N, S] int32 (the slot each slot merges into; a slot
    that stays itself targets its own index); weight [B, N, S] float32 (0 = ignored).
    Returns (k, v [B, N, S, H] in kv's dtype, total weight [B, N, S]): slot t holds
    sum_s w_s x_s / sum_s w_s over the slots s with target[s] == t."""
    b, n, s, h = kv.k.shape
    seg = (jnp.arange(b * n, dtype=jnp.int32).reshape(b, n, 1) * s + target).reshape(-1)
    w = weight.astype(jnp.float32).reshape(-1)
    total = jax.ops.segment_sum(w, seg, num_segments=b * n * s).reshape(b, n, s)
    safe = jnp.where(total > 0, total, 1.0)[..., None]

    def merged(x):
        xs = jax.ops.segment_sum(w[:, None] * x.reshape(-1, h).astype(jnp.float32), seg, num_segments=b * n * s)
        return (xs.reshape(b, n, s, h) / safe).astype(x.dtype)

    return merged(kv.k), merged(kv.v), total


def nearest_anchor(pos: jax.Array, anchor: jax.Array) -> jax.Array:
    """For every slot, the anchor slot nearest in position (ties: the older anchor).

    pos [B, N, S] (-1 empty); anchor [B, N, S] bool (a subset of the valid slots, at least
    one per row/head). Returns slot indices [B, N, S] int32 (anchors map to themselves)."""
    b, n, s = pos.shape
    order = position_order(pos)
    pos_s, a_s = take(pos, order), take(anchor, order)
    i = jnp.arange(s, dtype=jnp.int32)[None, None, :]
    prev = jax.lax.cummax(jnp.where(a_s, i, -1), axis=2)
    nxt = jax.lax.cummin(jnp.where(a_s, i, s), axis=2, reverse=True)
    d_prev = jnp.where(prev >= 0, pos_s - take(pos_s, jnp.maximum(prev, 0)), jnp.iinfo(jnp.int32).max)
    d_next = jnp.where(nxt < s, take(pos_s, jnp.minimum(nxt, s - 1)) - pos_s, jnp.iinfo(jnp.int32).max)
    chosen = jnp.where(d_prev <= d_next, prev, nxt)
    target_sorted = take(order, jnp.clip(chosen, 0, s - 1))
    bi, ni = jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None]
    return jnp.zeros((b, n, s), jnp.int32).at[bi, ni, order].set(target_sorted.astype(jnp.int32))


def head_mean_mass(key_mass: jax.Array, group_size: int) -> jax.Array:
    """[B, N, S] mass summed over each KV head's query heads -> the mean over all query
    heads, broadcast to every KV head (prefill slots are aligned across KV heads)."""
    m = jnp.sum(key_mass.astype(jnp.float32), axis=1, keepdims=True) / (key_mass.shape[1] * group_size)
    return jnp.broadcast_to(m, key_mass.shape)


@struct.dataclass
class ElasticKV(EvictingKV):
    """Elastic Cache's decode state: an EvictingKV (score = slot weights, the original tokens
    each slot averages) whose pending decision also names anchor [B, N] int32, the slot the
    truncated token `victim` merges into where `pending`."""

    anchor: jax.Array

    @classmethod
    def settled(cls, kv: SlotKV, score: jax.Array, limit: jax.Array) -> ElasticKV:
        """A state with nothing pending (what the final prefill chunk hands to decoding)."""
        none = jnp.zeros(limit.shape, jnp.int32)
        return cls(kv, score, limit, none, jnp.zeros(limit.shape, bool), none)

    def decision(self) -> list[jax.Array]:
        return [self.victim, self.pending, self.anchor]


def merge_pending(state: ElasticKV) -> ElasticKV:
    """`state` with its pending merge applied: where `pending`, the anchor's K and V become the
    weighted mean of its own and the victim's, the anchor takes both weights and the victim slot
    is emptied (weight 0, position -1); nothing pending afterwards. Idempotent."""
    kv, weight, victim, anchor, full = state.kv, state.score, state.victim, state.anchor, state.pending
    b, n, _ = kv.pos.shape
    bi, ni = jnp.arange(b)[:, None], jnp.arange(n)[None]
    vpos = kv.pos[bi, ni, victim]
    wv, wa = weight[bi, ni, victim], weight[bi, ni, anchor]
    tot = jnp.maximum(wv + wa, 1e-30)

    def mix(x):
        xa, xv = x[bi, ni, anchor].astype(jnp.float32), x[bi, ni, victim].astype(jnp.float32)
        new = (wa[..., None] * xa + wv[..., None] * xv) / tot[..., None]
        return x.at[bi, ni, anchor].set(jnp.where(full[..., None], new, xa).astype(x.dtype))

    weight = weight.at[bi, ni, anchor].set(jnp.where(full, wa + wv, wa))
    weight = weight.at[bi, ni, victim].set(jnp.where(full, 0.0, wv))
    pos = kv.pos.at[bi, ni, victim].set(jnp.where(full, -1, vpos))
    kv = kv.replace(k=mix(kv.k), v=mix(kv.v), pos=pos)
    return state.replace(kv=kv, score=weight, pending=jnp.zeros_like(full))


@register
@dataclasses.dataclass(frozen=True)
class ElasticCache(EvictionPolicy):
    """budget: fraction of the prompt kept as anchors (any ratio in (0, 1]); sink: leading
    tokens always kept; offset: most recent tokens never merged while decoding (the
    authors' distance=-25)."""

    name = "elastic"
    budget: float = 0.2
    sink: int = 4
    offset: int = 25
    evicts_on_decode = True

    def __post_init__(self):
        super().__post_init__()
        check_positive("sink", self.sink, 0)
        check_positive("offset", self.offset, 1)

    def keep_floor(self) -> int:
        """The sinks and the last prompt token are always anchors: a row of at most sink + 1
        tokens is kept whole."""
        return self.sink + 1

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        kv = SlotKV.empty(batch, config.num_kv_heads, prompt_len, config.head_dim, dtype)
        return ScoredKV(kv, jnp.zeros(kv.pos.shape, jnp.float32), jnp.zeros(kv.pos.shape[:2], jnp.int32))

    # -- instruction encoding -------------------------------------------------------------
    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        """Append a prompt chunk, attend, accumulate attention frequency; merge after the
        final chunk. state: ScoredKV (score = frequency so far)."""
        kv = slots.append(state.kv, k, v, q_pos)
        res = self.attend(kv, q, q_pos, ctx, want_mass=True)
        freq = state.score + head_mean_mass(res.key_mass, ctx.config.group_size)
        st = ScoredKV(kv, freq, state.limit)
        return (self.compress(st, ctx) if ctx.final else st), res.out

    def compress(self, state, ctx: LayerContext, **observations):
        """Anchors by frequency, every other token merged onto its nearest anchor.
        Returns ElasticKV(kv [B, N, C + 1, H], weight [B, N, C + 1], kept count [B, N]), nothing
        pending."""
        kv, freq = state.kv, state.score
        lengths = slots.row_lengths(kv.pos)
        protected = (kv.pos >= 0) & ((kv.pos < self.sink) | (kv.pos == lengths[:, None, None] - 1))
        scores = jnp.where(protected, jnp.inf, freq)
        cap = min(self.capacity(ctx.prompt_bound, ctx), kv.capacity)
        idx, valid = slots.select_indices(kv, scores, self.keep_counts(lengths, ctx), cap)
        b, n, _ = kv.pos.shape
        bi, ni = jnp.arange(b)[:, None, None], jnp.arange(n)[None, :, None]
        anchor = jnp.zeros(kv.pos.shape, bool).at[bi, ni, idx].set(valid)  # top_k indices are distinct
        target = nearest_anchor(kv.pos, anchor)
        k, v, weight = merge_onto(kv, target, (kv.pos >= 0).astype(jnp.float32))
        kept = slots.gather(kv.replace(k=k, v=v), idx, valid, 1, align=True)  # one spare slot for decode
        w = jnp.pad(jnp.where(valid, take(weight, idx), 0.0), ((0, 0), (0, 0), (0, kept.capacity - idx.shape[2])))
        return ElasticKV.settled(kept, w, jnp.sum(valid, axis=2).astype(jnp.int32))

    # -- output generation ----------------------------------------------------------------
    def truncation_slot(self, pos: jax.Array, newest: jax.Array) -> jax.Array:
        """[B, N] slot at the truncation point: the newest token that has `offset` newer ones
        (the oldest non-sink token of a shorter cache; a sink only when nothing else is left).
        pos [B, N, S]; newest [B, N, S] bool marks the token just written (never chosen)."""
        cand = (pos >= 0) & ~newest
        key = jnp.where(cand, jnp.where(pos >= self.sink, pos, pos - 2**30), jnp.iinfo(jnp.int32).min)
        k = min(self.offset, pos.shape[2])
        _, order = jax.lax.top_k(key, k)  # newest first, sinks after every other token
        n_free = jnp.sum(cand & (pos >= self.sink), axis=2)
        rank = jnp.clip(jnp.minimum(self.offset - 1, n_free - 1), 0, k - 1)
        truncated = jnp.take_along_axis(order, rank[..., None], axis=2)[..., 0]
        oldest = jnp.argmin(jnp.where(cand, pos, jnp.iinfo(jnp.int32).max), axis=2)
        return jnp.where(n_free > 0, truncated, oldest)

    def maintain(self, state, ctx: LayerContext):
        """Apply the merge the last decode step left pending (`merge_pending`)."""
        return merge_pending(state) if isinstance(state, ElasticKV) else state

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        """Apply the previous step's pending merge, write the new token into the first empty
        slot, attend, then (cache over size) choose the merge of this step and leave it pending:
        the token at the truncation point into its nearest neighbour by position."""
        if not isinstance(state, ScoredKV) or state.kv.pos.shape != state.score.shape:
            raise PolicyError("elastic decodes on the merged state its final prefill chunk produces")
        if k.shape[1] != 1:
            raise PolicyError(f"elastic merges one token per decode step; got {k.shape[1]} new tokens")
        if not isinstance(state, ElasticKV):
            raise PolicyError(
                f"elastic decodes on the merged state (ElasticKV) its final prefill chunk produces; got a "
                f"{type(state).__name__} (a prompt still being encoded)"
            )
        state = merge_pending(state)  # before anything below reads the cache
        kv = state.kv
        b, n, s = kv.pos.shape
        bi, ni = jnp.arange(b)[:, None], jnp.arange(n)[None]
        free = jnp.argmin(jnp.where(kv.pos < 0, 0, 1), axis=2)
        kv = slots.write_slot(kv, free, k, v, q_pos)
        weight = state.score.at[bi, ni, free].set(1.0)
        res = self.attend(kv, q, q_pos, ctx)
        full = jnp.sum(kv.pos >= 0, axis=2) > state.limit
        victim = self.truncation_slot(kv.pos, kv.pos == q_pos[:, :1, None])
        vpos = kv.pos[bi, ni, victim]
        dist = jnp.abs(kv.pos - vpos[..., None]).astype(jnp.float32) * 2 + (kv.pos > vpos[..., None])
        others = (kv.pos >= 0) & (jnp.arange(s)[None, None] != victim[..., None])
        anchor = jnp.argmin(jnp.where(others, dist, jnp.inf), axis=2)
        new = ElasticKV(kv, weight, state.limit, victim.astype(jnp.int32), full, anchor.astype(jnp.int32))
        return new, res.out
