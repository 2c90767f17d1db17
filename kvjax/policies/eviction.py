"""Shared machinery of score-based eviction (kvpress's ScorerPress, in pure JAX).

A subclass defines `scores(state, q, q_pos, res, ctx) -> [B, N, S]` (higher = keep).
After the final prompt chunk the cache keeps, per row, floor(budget * length) slots per
KV head in a new, smaller state: real memory savings, not a mask. Policies that also evict
while decoding (`evicts_on_decode`) keep one spare slot: each step writes the new token
into it, attends, then picks the lowest-scoring slot to empty.

Lazy eviction: a step stores only its choice (`EvictingKV.victim` / `pending`, [B, N]); the
next step empties that slot first, then writes its token into the first empty slot, then
attends. Attention sees exactly the slots it would see had the step emptied the slot itself,
but every write to the cache happens before attention reads it, so the compiled decode loop
updates the state buffers in place (a write after the read makes XLA copy the [B, N, S]
positions every step). `maintain` applies a pending choice; `generate`'s decode loop calls it
when it stops, so a returned state holds exactly the kept tokens.

Short rows (the per-row rule, docs/memory.md): every count is decided per row from its
true length L, never from the padded bucket. A row keeps min(L, max(floor(budget * L),
`keep_floor()`)) tokens, where the floor is the method's observation or recent window
(SnapKV, PyramidKV, AdaKV, ChunkKV with SnapKV scores, KVMerger), sinks + 1 (StreamingLLM,
Elastic Cache) or 1: a row no longer than its floor is kept whole, and one whose budget is
smaller than its window keeps the whole window. The static capacity is that count for the
static bound on the batch's true lengths (`LayerContext.prompt_bound`); the count grows with
L, so it holds every row's count, and a row keeps the same tokens alone or in any batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from .. import attention
from ..state import LayerContext, SlotKV, leaves_nbytes, slot_bytes_used
from . import slots
from .base import Policy, PolicyError, budget_capacity, check_budget


@struct.dataclass
class ScoredKV:
    """A SlotKV plus a running per-slot score [B, N, S] (float32) and each (row, head)'s
    slot budget [B, N] int32, for decode-time eviction."""

    kv: SlotKV
    score: jax.Array
    limit: jax.Array

    def nbytes_used(self) -> int:
        """Bytes of the slots that hold a token (K, V, position, score) plus the budgets."""
        return slot_bytes_used(
            self.kv.pos >= 0, [self.kv.k, self.kv.v, self.kv.pos, self.score], [self.kv.fill, self.limit]
        )

    def nbytes_read_per_step(self) -> int:
        """Bytes one decode step reads: every slot's K, V, position and running score (attention
        visits every slot, the eviction ranks them all) plus the budgets."""
        return leaves_nbytes(self)


@struct.dataclass
class EvictingKV(ScoredKV):
    """The state of a policy that evicts while decoding (`evicts_on_decode`): a ScoredKV plus
    the eviction the last decode step chose and left pending (lazy eviction, module doc):
    victim [B, N] int32, the slot to empty; pending [B, N] bool, whether it is to be emptied
    (the (row, head) was over its budget). `maintain` / the next decode step apply it."""

    victim: jax.Array
    pending: jax.Array

    @classmethod
    def settled(cls, kv: SlotKV, score: jax.Array, limit: jax.Array) -> EvictingKV:
        """A state with nothing pending (what the final prefill chunk hands to decoding)."""
        return cls(kv, score, limit, jnp.zeros(limit.shape, jnp.int32), jnp.zeros(limit.shape, bool))

    def decision(self) -> list[jax.Array]:
        """The [B, N] leaves that hold the pending decision."""
        return [self.victim, self.pending]

    def nbytes_used(self) -> int:
        """ScoredKV's bytes plus the pending decision's."""
        per_slot = [self.kv.k, self.kv.v, self.kv.pos, self.score]
        return slot_bytes_used(self.kv.pos >= 0, per_slot, [self.kv.fill, self.limit, *self.decision()])


def evict_pending(state: EvictingKV) -> EvictingKV:
    """`state` with its pending eviction applied: position -1 at `victim` where `pending`, and
    nothing pending. Idempotent (a settled state comes back unchanged in value)."""
    kv = state.kv
    bi, ni = jnp.arange(kv.pos.shape[0])[:, None], jnp.arange(kv.pos.shape[1])[None]
    pos = kv.pos.at[bi, ni, state.victim].set(jnp.where(state.pending, -1, kv.pos[bi, ni, state.victim]))
    return state.replace(kv=kv.replace(pos=pos), pending=jnp.zeros_like(state.pending))


@dataclasses.dataclass(frozen=True)
class EvictionPolicy(Policy):
    """Base of the eviction methods; `budget` is the fraction of the prompt kept."""

    budget: float = 0.2

    def __post_init__(self):
        check_budget(self.budget)

    # -- sizes --------------------------------------------------------------------------
    def keep_floor(self) -> int:
        """Tokens a row keeps at least (all of a row not longer than this); see module doc."""
        return 1

    def prefill_capacity(self, prompt_len, max_new_tokens):
        return prompt_len

    def capacity(self, prompt_len: int, ctx: LayerContext) -> int:
        """Static kept-slot count per KV head for this layer: the count of a row of
        `prompt_len` tokens (pass `ctx.prompt_bound`), the largest any row can need."""
        return budget_capacity(self.budget, prompt_len, self.keep_floor())

    def keep_counts(self, lengths: jax.Array, ctx: LayerContext) -> jax.Array:
        """Per-row kept-slot counts [B] (or [B, N]) for true prompt lengths [B]."""
        return slots.keep_counts(lengths, self.budget, self.keep_floor())

    # -- prefill ------------------------------------------------------------------------
    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        state = slots.append(state, k, v, q_pos)
        res = self.attend(state, q, q_pos, ctx, want_mass=self.wants_mass(ctx))
        if ctx.final:
            state = self.compress(state, ctx, q=q, q_pos=q_pos, res=res)
        return state, res.out

    def scores(self, state: SlotKV, q, q_pos, res, ctx: LayerContext) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} must define scores()")

    def compress(self, state, ctx: LayerContext, *, q=None, q_pos=None, res=None):
        lengths = slots.row_lengths(state.pos)
        scores = self.scores(state, q, q_pos, res, ctx)
        cap = min(self.capacity(ctx.prompt_bound, ctx), state.capacity)
        keep = self.keep_counts(lengths, ctx)
        idx, valid = slots.select_indices(state, scores, keep, cap)
        if not self.evicts_on_decode:
            return slots.gather(state, idx, valid, ctx.max_new_tokens, align=True)
        kept = slots.gather(state, idx, valid, 1, align=True)  # spare slots (at least one) for decode-time eviction
        carried = jnp.take_along_axis(self.carried_score(state, res, ctx), idx, axis=2)
        carried = jnp.pad(jnp.where(valid, carried, 0.0), ((0, 0), (0, 0), (0, kept.capacity - idx.shape[2])))
        return EvictingKV.settled(kept, carried, jnp.sum(valid, axis=2).astype(jnp.int32))

    # -- decode-time eviction -------------------------------------------------------------
    def carried_score(self, state: SlotKV, res, ctx) -> jax.Array:
        """Per-slot running score carried from the prompt into decoding [B, N, S]."""
        return jnp.zeros(state.pos.shape, jnp.float32)

    def decode_score(self, st: ScoredKV, res, q_pos, ctx) -> jax.Array:
        """Running score [B, N, S] after a decode step (stored in the state)."""
        raise NotImplementedError(f"{type(self).__name__} must define decode_score()")

    def eviction_rank(self, score: jax.Array, kv: SlotKV) -> jax.Array:
        """Ranking used to pick the slot freed after a decode step (lowest goes)."""
        return score

    def maintain(self, state, ctx: LayerContext):
        """Apply the eviction the last decode step left pending (`evict_pending`)."""
        return evict_pending(state) if isinstance(state, EvictingKV) else state

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        """Apply the previous step's pending eviction, write the new token into the first empty
        slot, attend, then choose (and leave pending) the slot this step evicts: the lowest
        `eviction_rank` among the older tokens, where the (row, head) holds more than its budget."""
        if not self.evicts_on_decode:
            return super().decode(state, q, k, v, q_pos, ctx)
        if k.shape[1] != 1:
            raise PolicyError(f"{self.name} evicts one token per decode step; got {k.shape[1]} new tokens")
        if not isinstance(state, EvictingKV):
            raise PolicyError(
                f"{self.name} decodes on the EvictingKV its final prefill chunk produces; got {type(state).__name__}"
            )
        state = self.maintain(state, ctx)  # the previous step's eviction, before attention reads
        kv = state.kv
        free = jnp.argmin(jnp.where(kv.pos < 0, 0, 1), axis=2)  # an empty slot (there is always one)
        kv = slots.write_slot(kv, free, k, v, q_pos)
        bi, ni = jnp.arange(kv.pos.shape[0])[:, None], jnp.arange(kv.pos.shape[1])[None]
        st = state.replace(kv=kv, score=state.score.at[bi, ni, free].set(0.0))
        res = self.attend(kv, q, q_pos, ctx, want_mass=True)
        score = self.decode_score(st, res, q_pos, ctx)
        # Never evict the token just written: it is the newest and the next query's neighbour.
        newest = kv.pos == q_pos[:, :1, None]
        ranked = jnp.where((kv.pos < 0) | newest, jnp.inf, self.eviction_rank(score, kv))
        victim = jnp.argmin(ranked, axis=2).astype(jnp.int32)
        full = jnp.sum(kv.pos >= 0, axis=2) > state.limit  # evict only beyond the row's budget
        return st.replace(score=score, victim=victim, pending=full), res.out


def observation_window(q, q_pos, window: int, ctx: LayerContext):
    """The last `window` queries of each row: q_win [B, W, Nq, H], pos_win [B, W] (-1 where
    the row is shorter than the window or its window lies before this chunk)."""
    _b, t = q_pos.shape
    lengths = jnp.max(q_pos, axis=1) + 1
    start = ctx.prompt_len - t  # the final chunk covers [prompt_len - t, prompt_len)
    wanted = lengths[:, None] - window + jnp.arange(window)[None, :]  # absolute positions
    local = wanted - start
    ok = (wanted >= 0) & (local >= 0) & (local < t)
    idx = jnp.clip(local, 0, t - 1)
    q_win = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
    return q_win, jnp.where(ok, wanted, -1)


def window_attention(state: SlotKV, q, q_pos, window: int, ctx: LayerContext) -> jax.Array:
    """Softmax weights of the observation window over the cache, [B, N, G, W, S] float32."""
    q_win, pos_win = observation_window(q, q_pos, window, ctx)
    return attention.attention_probs(q_win, state.k, pos_win, state.pos, window=ctx.config.sliding_window)


def protect_window(scores: jax.Array, state: SlotKV, window: int) -> jax.Array:
    """Give each row's last `window` tokens the top score (kvpress pads them with max + 1)."""
    lengths = slots.row_lengths(state.pos)
    in_window = state.pos >= (lengths[:, None, None] - window)
    top = jnp.max(jnp.where(state.pos >= 0, scores, -jnp.inf)) + 1.0
    return jnp.where(in_window & (state.pos >= 0), top, scores)
