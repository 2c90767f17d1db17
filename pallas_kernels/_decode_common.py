"""Pieces shared by the decode kernels: GQA row grouping, the online-softmax step (in registers
for the Triton kernels, in VMEM scratch refs for the Mosaic TPU ones), and the LSE merge of
split-K partial results."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NEG_INIT = -1e30  # running-max start: finite, so fully masked blocks give p = 0, alpha = 1


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def group_rows(q, n: int):
    """q [B, T, N*Gq, H] -> rows [B, N, rows_p, H] (row = t * Gq + g, zero-padded to a power
    of two >= 16 so the tensor-core dot applies) and the unpadded row count."""
    b, t, nq, h = q.shape
    gq = nq // n
    rows = t * gq
    rows_p = max(16, next_pow2(rows))
    qr = q.reshape(b, t, n, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, n, rows, h)
    return jnp.pad(qr, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0))), rows


def ungroup_rows(out, lse, t: int, rows: int):
    """Inverse of `group_rows` for out [B, N, rows_p, H] and lse [B, N, rows_p]."""
    b, n, _, h = out.shape
    gq = rows // t
    out = out[:, :, :rows].reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n * gq, h)
    lse = lse[:, :, :rows].reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, n * gq)
    return out, lse


def masked_softmax(logits):
    """logits [..., S] (-inf = masked) -> (probabilities [..., S], natural-log LSE [...]); rows
    with every key masked give p = 0 and LSE -inf (the references' convention)."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    seen = jnp.isfinite(m)
    p = jnp.exp(logits - jnp.where(seen, m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(seen, l, 1.0), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]


def init_carry(rows: int, h: int):
    return (
        jnp.zeros((rows, h), jnp.float32),
        jnp.full((rows,), NEG_INIT, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_update(carry, s, v):
    """One flash step: carry (acc [rows,H], m [rows], l [rows]), scaled masked logits s
    [rows, n] (-inf = masked), values v [n, H]."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l


def finish(carry, o_ref, lse_ref):
    """Write the normalized output and the natural-log LSE (-inf, out 0 for empty rows)."""
    acc, m, l = carry
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def merge_splits(o, lse, axis: int = 2):
    """Merge normalized partial outputs o [..., P, rows, H] and lse [..., P, rows] over P."""
    m = jnp.max(lse, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)
    total = jnp.sum(w, axis=axis)
    out = jnp.sum(o.astype(jnp.float32) * w[..., None], axis=axis) / jnp.where(total > 0, total, 1.0)[..., None]
    m_safe = jnp.squeeze(m_safe, axis)
    return out, jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def per_head(x, b: int, n: int, name: str):
    """Lengths given per row [B] or per (row, kv head) [B, N] -> int32 [B, N]."""
    x = checked_lengths(x, b, n, name)
    return jnp.broadcast_to(x[:, None], (b, n)) if x.ndim == 1 else x


def checked_lengths(x, b: int, n: int, name: str):
    """Lengths given per row [B] or per (row, kv head) [B, N] -> int32, same shape (kernels that
    index either shape themselves save the broadcast's launch)."""
    x = jnp.asarray(x, jnp.int32)
    if x.shape not in ((b,), (b, n)):
        raise ValueError(f"{name} must be [B]=({b},) or [B, N]=({b}, {n}); got shape {x.shape}")
    return x


def clean_selection(block_indices, counts, lengths, *, block_size: int, num_blocks: int):
    """block_indices [B, N, K], counts [B, N], lengths [B, N] -> (indices [B, N, K] int32: the
    kept blocks sorted and packed to the front, then the last kept one repeated (0 if none);
    kept counts [B, N] int32). Kept = listed (j < count), 0 <= idx, idx * block_size < length,
    first occurrence."""
    kk = block_indices.shape[-1]
    nvalid = (jnp.clip(lengths, 0, num_blocks * block_size) + block_size - 1) // block_size
    idx = block_indices.astype(jnp.int32)
    ok = (jnp.arange(kk) < counts[..., None]) & (idx >= 0) & (idx < nvalid[..., None])
    key = jnp.sort(jnp.where(ok, idx, num_blocks), axis=-1)  # num_blocks = "dropped", sorts last
    dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
    key = jnp.sort(jnp.where(dup, num_blocks, key), axis=-1)
    kept = jnp.sum(key < num_blocks, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(key, jnp.maximum(kept - 1, 0)[..., None], axis=-1)
    last = jnp.where(kept[..., None] > 0, last, 0)
    return jnp.where(jnp.arange(kk) < kept[..., None], key, last), kept


def scratch_init(m_scr, l_scr, acc_scr):
    """Start an online softmax held in scratch refs m, l [rows, 1] and acc [rows, H]."""
    m_scr[...] = jnp.full(m_scr.shape, NEG_INIT, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)


def scratch_update(m_scr, l_scr, acc_scr, s, v):
    """`online_update` on scratch refs: scaled masked logits s [rows, n], values v [n, H]."""
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_scr[...] = l_scr[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * alpha + pv
    m_scr[...] = m_new


def scratch_finish(m_scr, l_scr, acc_scr, o_ref, lse_ref):
    """`finish` from scratch refs (lse reshaped to lse_ref's block)."""
    l = l_scr[...]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(l_safe), -jnp.inf).reshape(lse_ref.shape)
