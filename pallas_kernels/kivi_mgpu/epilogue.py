"""The XLA side of the Hopper KIVI decode kernel (`kernel.py`): finishing
each split's partial sums (the value offset and zero points added back, normalized), the
full-precision residual window, and the merge of all of them through their log-sum-exps
(Liu et al. 2024, KIVI, https://arxiv.org/abs/2402.02750: quantized tokens plus a residual
window of recent ones in full precision). `merge.py` does the same in one Triton kernel; this
is its jnp reference, and the kernel's epilogue where the merge does not apply (H or the number
of splits not a power of two)."""

from __future__ import annotations

import math

import jax.numpy as jnp

from .._decode_common import masked_softmax, merge_splits


def finish_splits(acc, corr, lsum, m, *, rows_q, gv, row_stride=1):
    """Per split: out [B,N,P,rows,H] (normalized) and lse [B,N,P,rows] (natural log). The column
    sums corr and lsum are split over rows 0, row_stride, ... of their 64 (1: per thread, 16:
    per warp; the rows between repeat them)."""
    b, n, p, h, _ = acc.shape
    n_gc = h // gv
    acc = acc[..., : n_gc * rows_q]  # the columns past H/Gv * rows repeat these
    col = corr[..., ::row_stride, : n_gc * rows_q].sum(axis=3)  # [B,N,P,H/Gv * rows]
    l = lsum[..., ::row_stride, :].sum(axis=3)[..., :rows_q]  # [B,N,P,rows] (every value group holds the same sums)
    m2 = m[:, :, :, 0, :rows_q]
    full = (acc + col[:, :, :, None, :]).reshape(b, n, p, h, n_gc, rows_q)
    grp = jnp.arange(h) // gv
    out = jnp.take_along_axis(full, grp[None, None, None, :, None, None], axis=4)[:, :, :, :, 0, :]  # [B,N,P,H,rows]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.swapaxes(out, 3, 4) / l_safe[..., None]
    lse = jnp.where(seen, (m2 + jnp.log2(l_safe)) * math.log(2.0), -jnp.inf)
    return out, lse


def residual_partial(qr, k_res, v_res, res_lengths, *, t, scale):
    """Attention of the query rows qr [B,N,rows,H] to the residual window (XLA, float32):
    (out [B,N,1,rows,H], lse [B,N,1,rows]); query t sees slots < res_len - (T - 1 - t)."""
    rows = qr.shape[2]
    r = k_res.shape[2]
    sc = jnp.einsum("bnqh,bnrh->bnqr", qr.astype(jnp.float32), k_res.astype(jnp.float32), precision="highest") * scale
    row_t = jnp.arange(rows) // (rows // t)
    limit = res_lengths[:, :, None] - (t - 1 - row_t)[None, None, :]
    sc = jnp.where(jnp.arange(r)[None, None, None, :] < limit[..., None], sc, -jnp.inf)
    p, lse = masked_softmax(sc)
    out = jnp.einsum("bnqr,bnrh->bnqh", p, v_res.astype(jnp.float32), precision="highest")
    return out[:, :, None], lse[:, :, None]


def assemble(partials, *, rows_q: int, rows_p: int, gv: int, t: int, residual=None, row_stride: int = 1):
    """The kernel's partials (acc [B,N,P,H,NB], corr [B,N,P,64,NC], lsum, m [B,N,P,64,NS]) for
    rows_p padded query rows -> (out [B, T, N*Gq, H] float32, lse [B, T, N*Gq]): each split
    finished, the padding rows dropped, the residual window's (out, lse) (`residual_partial`)
    appended as one more split, all merged; rows are ordered (t, query head of the group).
    row_stride: as in `finish_splits`."""
    out, lse = finish_splits(*partials, rows_q=rows_p, gv=gv, row_stride=row_stride)
    out, lse = out[:, :, :, :rows_q], lse[:, :, :, :rows_q]  # drop the padding rows
    if residual is not None:
        out, lse = jnp.concatenate([out, residual[0]], axis=2), jnp.concatenate([lse, residual[1]], axis=2)
    out, lse = merge_splits(out, lse)
    b, n, _, h = out.shape
    gq = rows_q // t
    out = out.reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n * gq, h)
    lse = lse.reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, n * gq)
    return out, lse
