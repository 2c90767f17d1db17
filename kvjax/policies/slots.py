"""Slot operations shared by policies: append, gather, top-k selection, replacement, rollback.

All functions are pure and shape-static; per-row / per-head counts are data. A `SlotKV`'s
write offset `fill` is a scalar (every row appends at the same slot, what a prefill makes) or
[B] (row b appends at fill[b], after `truncate_slots` or `kvjax.policies.rows.per_row_fill`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..state import SlotKV

#: Long slot caches are allocated in multiples of this many slots (`aligned`): the GPU decode
#: kernel reads a cache in blocks of 16-64 slots, and a capacity that is not a multiple of the
#: block sends every decode step to the jnp reference attention instead
#: (`kvjax.attention.fallbacks()`).
SLOT_MULTIPLE = 64
#: ... from this many slots on (at most 63 spare slots, about 6%); shorter caches keep their exact size,
#: where the reference attention costs little and the spare slots would be a large share.
ALIGN_FROM = 1024


def to_heads_major(x: jax.Array) -> jax.Array:
    """[B, T, N, H] -> [B, N, T, H]."""
    return jnp.swapaxes(x, 1, 2)


def write_rows(buf: jax.Array, x: jax.Array, start: jax.Array, axis: int = 2) -> jax.Array:
    """`buf` [B, ...] with `x` [B, ...] written along `axis` from `start`: a scalar (every row,
    one `dynamic_update_slice`) or [B] int32 (row b from start[b])."""
    start = jnp.asarray(start, jnp.int32)
    if start.ndim == 0:
        idx = [jnp.zeros((), jnp.int32)] * buf.ndim
        idx[axis] = start
        return jax.lax.dynamic_update_slice(buf, x.astype(buf.dtype), idx)

    def one(row, xr, s):
        idx = [jnp.zeros((), jnp.int32)] * row.ndim
        idx[axis - 1] = s
        return jax.lax.dynamic_update_slice(row, xr.astype(row.dtype), idx)

    return jax.vmap(one)(buf, x, start)


def append(state: SlotKV, k: jax.Array, v: jax.Array, q_pos: jax.Array) -> SlotKV:
    """Write T new tokens (k, v [B, T, N, H], positions q_pos [B, T]) at slot `fill` (per row
    when `fill` is [B]).

    The caller sizes the capacity (generate reserves prompt + max_new_tokens slots); a
    chunk larger than the whole cache is an error at trace time."""
    b, t, n, _ = k.shape
    if t > state.capacity:
        raise ValueError(f"cannot append {t} tokens to a cache of capacity {state.capacity}")
    kk = to_heads_major(k).astype(state.k.dtype)
    vv = to_heads_major(v).astype(state.v.dtype)
    pp = jnp.broadcast_to(q_pos[:, None, :], (b, n, t)).astype(jnp.int32)
    start = jnp.minimum(state.fill, state.capacity - t)
    k = write_rows(state.k, kk, start)
    v = write_rows(state.v, vv, start)
    pos = write_rows(state.pos, pp, start)
    # Materialise the in-place update before attention reads the cache: XLA:CPU otherwise fuses
    # the update into the reading fusion and, since the write then needs the old buffer too,
    # copies the whole K or V buffer every decode step.
    k, v, pos = jax.lax.optimization_barrier((k, v, pos))
    return state.replace(k=k, v=v, pos=pos, fill=state.fill + t)


def row_lengths(pos: jax.Array) -> jax.Array:
    """Tokens seen per row [B] from slot positions [B, N, S] (max position + 1)."""
    return jnp.max(pos, axis=(1, 2)) + 1


def keep_counts(lengths: jax.Array, budget: float, minimum: int = 1) -> jax.Array:
    """Per-row number of tokens to keep [B] for true lengths [B]: floor(budget * length), at
    least `minimum` (a method's observation or recent window, 1 otherwise) and at most the
    row's length, so a row of at most `minimum` tokens is kept whole. Computed in float32
    exactly as `keep_count` computes the static count."""
    n = jnp.floor(lengths.astype(jnp.float32) * jnp.float32(budget) + jnp.float32(1e-4)).astype(jnp.int32)
    return jnp.minimum(jnp.maximum(n, minimum), lengths)


def keep_count(length: int, budget: float, minimum: int = 1) -> int:
    """`keep_counts` of one static length (python int), in the same float32 arithmetic."""
    n = int(np.floor(np.float32(length) * np.float32(budget) + np.float32(1e-4)))
    return min(max(n, minimum), length)


def select_indices(state: SlotKV, scores: jax.Array, keep: jax.Array, capacity: int):
    """Per (row, head), the slots of the `keep` highest scores, ordered by position.

    scores [B, N, S] (empty slots never chosen); keep [B] or [B, N] int32 <= capacity.
    Returns idx [B, N, capacity] int32 and valid [B, N, capacity] bool (kept slots first)."""
    if capacity > state.capacity:
        raise ValueError(f"cannot keep {capacity} slots out of {state.capacity}")
    scores = jnp.where(state.pos >= 0, scores.astype(jnp.float32), -jnp.inf)
    _, idx = jax.lax.top_k(scores, capacity)  # [B, N, C]
    rank = jnp.arange(capacity)[None, None, :]
    keep = keep[:, None] if keep.ndim == 1 else keep
    chosen_pos = jnp.take_along_axis(state.pos, idx, axis=2)
    valid = (rank < keep[..., None]) & (chosen_pos >= 0)
    # Order kept slots by position (stable, deterministic layout); empty ones last.
    order_key = jnp.where(valid, chosen_pos, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(order_key, axis=2)
    return jnp.take_along_axis(idx, order, axis=2), jnp.take_along_axis(valid, order, axis=2)


def select(state: SlotKV, scores: jax.Array, keep: jax.Array, capacity: int, headroom: int) -> SlotKV:
    """Keep the `keep` best slots per (row, head) (see `select_indices`) in a new state of
    static capacity `capacity + headroom`: kept slots first, the rest empty, fill = capacity."""
    idx, valid = select_indices(state, scores, keep, capacity)
    return gather(state, idx, valid, headroom)


def aligned(slots: int, always: bool = False) -> int:
    """`slots` rounded up to a multiple of `SLOT_MULTIPLE` when it is at least `ALIGN_FROM`
    (or `always`), else unchanged."""
    if slots < ALIGN_FROM and not always:
        return slots
    return -(-slots // SLOT_MULTIPLE) * SLOT_MULTIPLE


def gather(state: SlotKV, idx: jax.Array, valid: jax.Array, headroom: int, align: bool = False) -> SlotKV:
    """New state from slots idx [B, N, C] (invalid ones emptied) plus `headroom` empty slots;
    with `align`, plus as many more as make the capacity `aligned(C + headroom)` (a compressed
    cache the GPU decode kernel reads in place)."""
    k = jnp.take_along_axis(state.k, idx[..., None], axis=2)
    v = jnp.take_along_axis(state.v, idx[..., None], axis=2)
    pos = jnp.where(valid, jnp.take_along_axis(state.pos, idx, axis=2), -1)
    c = idx.shape[2]
    if align:
        headroom = aligned(c + headroom) - c
    if headroom:
        pad = ((0, 0), (0, 0), (0, headroom), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        pos = jnp.pad(pos, ((0, 0), (0, 0), (0, headroom)), constant_values=-1)
    return SlotKV(k=k, v=v, pos=pos, fill=jnp.asarray(c, jnp.int32))


def write_slot(state: SlotKV, slot: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array) -> SlotKV:
    """Write one new token per row (k, v [B, 1, N, H], q_pos [B, 1]) into slot [B, N]."""
    b, _, n, _ = k.shape
    bi = jnp.arange(b)[:, None]
    ni = jnp.arange(n)[None, :]
    kk = k[:, 0].astype(state.k.dtype)  # [B, N, H]
    vv = v[:, 0].astype(state.v.dtype)
    pp = jnp.broadcast_to(q_pos[:, :1], (b, n)).astype(jnp.int32)
    return state.replace(
        k=state.k.at[bi, ni, slot].set(kk),
        v=state.v.at[bi, ni, slot].set(vv),
        pos=state.pos.at[bi, ni, slot].set(pp),
        fill=state.fill + 1,
    )


def truncate_slots(state: SlotKV, lengths: jax.Array) -> SlotKV:
    """Roll a slot cache back to per-row lengths [B]: every slot holding a position >= lengths[b]
    is emptied (K, V zeroed, position -1, as in a cache that never held it) and row b's write
    offset moves back to its first emptied slot, so the next append reuses those slots. `fill`
    becomes [B].

    For tokens that were appended after everything kept (decode steps, a continued prefill),
    the result equals the state that never saw them. Slots are never reused while a later slot
    still holds a token (the offset stays after the row's last kept slot)."""
    b, _, s = state.pos.shape
    lengths = jnp.asarray(lengths, jnp.int32)
    drop = state.pos >= lengths[:, None, None]
    slot = jnp.arange(s, dtype=jnp.int32)
    first_drop = jnp.min(jnp.where(drop, slot, s), axis=(1, 2))
    kept = (state.pos >= 0) & ~drop
    after_kept = jnp.max(jnp.where(kept, slot + 1, 0), axis=(1, 2))
    fill = jnp.broadcast_to(state.fill, (b,)).astype(jnp.int32)
    fill = jnp.minimum(fill, jnp.maximum(first_drop, after_kept))
    return SlotKV(
        k=jnp.where(drop[..., None], jnp.zeros((), state.k.dtype), state.k),
        v=jnp.where(drop[..., None], jnp.zeros((), state.v.dtype), state.v),
        pos=jnp.where(drop, -1, state.pos),
        fill=fill,
    )


def pool1d(x: jax.Array, kernel: int, kind: str = "avg") -> jax.Array:
    """Same-length 1-D pooling over the last axis (zero padding, count_include_pad like
    torch's avg_pool1d; -inf padding for max)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    widths = [(0, 0)] * (x.ndim - 1) + [(pad, pad)]
    if kind == "avg":
        xp = jnp.pad(x, widths)
        out = jax.lax.reduce_window(xp, 0.0, jax.lax.add, (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim, "VALID")
        return out / kernel
    xp = jnp.pad(x, widths, constant_values=-jnp.inf)
    return jax.lax.reduce_window(xp, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,), (1,) * x.ndim, "VALID")
