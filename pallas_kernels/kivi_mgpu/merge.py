"""The Hopper KIVI decode kernel's epilogue as one Triton-lowered Pallas kernel: the split-K
partials finished (value offset and zero points added back), the full-precision residual window
attended, and all of them merged through their maxima (Liu et al. 2024, KIVI,
https://arxiv.org/abs/2402.02750: quantized tokens plus a window of recent ones in full
precision). Its jnp reference is `epilogue.assemble` with `residual_partial`, which XLA runs as
many small kernels; this one launch replaces them.

One program per (batch row, KV head, query row): it reads its column of every split at once (a
gather, so the load latency is paid once, not once per split), weighs the splits by their
maxima (log2 units, as the kernel keeps them), then reads the residual window in chunks of a
power of two (`residual_chunk`: any R, 192 for the KIVI policy's default window at G=32) and
merges each into the running max and sums. Of the column sums (corr, lsum) it reads only the
rows that hold distinct partial sums (`row_stride`: one row in 16 as the kernel leaves them,
summed per warp; 1 for sums kept per thread) and only its own query row's columns (strided
loads).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .. import _compat
from .._compat import pl

_FLOOR = -1e30  # the kernel's initial running max (log2 units): an empty split
MAX_RESIDUAL_CHUNK = 128  # residual slots a loop step reads (Triton blocks: a power of two)


def residual_chunk(r: int) -> int:
    """Slots of the residual window the merge reads at a time: the largest power of two that
    divides R, at most MAX_RESIDUAL_CHUNK (R = 192, the KIVI policy's window at G=32: 64)."""
    return min(r & -r, MAX_RESIDUAL_CHUNK)


def _kernel(acc_ref, corr_ref, lsum_ref, m_ref, *rest, rows_p, gv, t, gq, scale2, residual, row_stride):
    row = pl.program_id(2)
    splits, h, _ = acc_ref.shape
    ng = h // gv
    sums = pl.ds(0, corr_ref.shape[1] // row_stride, stride=row_stride)  # rows holding distinct column sums
    # every split at once (a loop over them pays the load latency once per split; many small
    # reductions pay a barrier each): channel c of value group g reads column g * rows_p + row
    mp = m_ref[:, 0, row]  # [P] (log2 units; equal on every tile row)
    lp = jnp.sum(lsum_ref[:, sums, pl.ds(row, 1)], axis=(1, 2))  # [P]
    mx = jnp.max(mp)
    w = jnp.exp2(mp - mx)  # empty splits (m = _FLOOR, l = 0) weigh nothing
    l = jnp.sum(w * lp)
    p_idx = lax.broadcasted_iota(jnp.int32, (splits, h), 0)
    h_idx = lax.broadcasted_iota(jnp.int32, (splits, h), 1)
    col = (h_idx // gv) * rows_p + row  # [P, H]
    c_g = jnp.sum(corr_ref[:, sums, pl.ds(row, ng, stride=rows_p)], axis=1)  # [P, H/Gv]: each group's sum
    g_idx = lax.broadcasted_iota(jnp.int32, (1, ng), 1)
    c = jnp.zeros((splits, h), jnp.float32)
    for g in range(ng):  # the group's column sum, for each of its channels
        c = jnp.where(h_idx // gv == g, jnp.sum(jnp.where(g_idx == g, c_g, 0.0), axis=1)[:, None], c)
    o = jnp.sum((acc_ref[p_idx, h_idx, col] + c) * w[:, None], axis=0)  # [H]
    if residual:  # the window, chunk by chunk, merged online
        q_ref, k_ref, v_ref, rl_ref, out_ref, lse_ref = rest
        r = k_ref.shape[0]
        rc = residual_chunk(r)
        bi, ni = pl.program_id(0), pl.program_id(1)
        qf = q_ref[...].astype(jnp.float32)[None, :]
        rl = jnp.minimum(rl_ref[bi, ni] if len(rl_ref.shape) == 2 else rl_ref[bi], r)  # clipped to R first
        limit = rl - (t - 1 - row // gq)  # query t sees slots < res_len - (T - 1 - t)

        def chunk(i, carry):
            mx, l, o = carry
            start = pl.multiple_of(i * rc, rc)
            sc = jnp.sum(k_ref[pl.ds(start, rc), :].astype(jnp.float32) * qf, axis=1) * scale2
            seen = start + lax.broadcasted_iota(jnp.int32, (rc,), 0) < limit
            mn = jnp.maximum(mx, jnp.max(jnp.where(seen, sc, _FLOOR)))
            al = jnp.exp2(mx - mn)
            pr = jnp.where(seen, jnp.exp2(sc - mn), 0.0)
            o = o * al + jnp.sum(v_ref[pl.ds(start, rc), :].astype(jnp.float32) * pr[:, None], axis=0)
            return mn, l * al + jnp.sum(pr), o

        mx, l, o = lax.fori_loop(0, r // rc, chunk, (mx, l, o))
    else:
        out_ref, lse_ref = rest
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    out_ref[...] = (o / l_safe).astype(out_ref.dtype)
    lse_ref[...] = jnp.full((1,), jnp.where(seen, (mx + jnp.log2(l_safe)) * math.log(2.0), -jnp.inf))


def merge_partials(
    partials,
    qr,
    k_res=None,
    v_res=None,
    res_lengths=None,
    *,
    rows_q: int,
    rows_p: int,
    gv: int,
    t: int,
    scale: float,
    row_stride: int = 1,
    out_dtype=jnp.bfloat16,
    num_warps: int = 4,
    interpret: bool = False,
):
    """partials (acc [B,N,P,H,NB], corr [B,N,P,64,NC], lsum and m [B,N,P,64,NS] float32: the
    kernel's per-split sums for rows_p padded query rows, `kernel.kernel_partials`; the column sums
    corr and lsum are split over rows 0, row_stride, 2 row_stride, ... of the 64: 1 where the
    kernel leaves them per thread, 16 where it sums them per warp); qr [B,N,rows_q,H] the query
    rows (unpermuted, unpadded; `query_columns`); optional residual window k_res/v_res [B,N,R,H]
    with res_lengths [B] or [B,N], read `residual_chunk(R)` slots at a time. Returns (out
    [B, T, N*Gq, H] out_dtype, lse [B, T, N*Gq] float32), rows ordered (t, query head of the
    group) as `assemble` does. H and P must be powers of two (Triton blocks)."""
    acc, corr, lsum, m = partials
    b, n, splits, h, _ = acc.shape
    residual = k_res is not None
    for name, val in (("head_dim H", h), ("splits P", splits), ("row_stride", row_stride)):
        if val & (val - 1) or val < 1:
            raise ValueError(f"{name}={val} must be a power of two for the Triton merge of the KIVI partials")
    if row_stride > corr.shape[3]:
        raise ValueError(f"row_stride={row_stride} must be at most the partials' {corr.shape[3]} rows")
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
    per_head = lambda a: pl.BlockSpec((None, None, *a.shape[2:]), lambda bi, ni, ri: (bi, ni) + (0,) * (a.ndim - 2))
    per_row = pl.BlockSpec((None, None, None, h), lambda bi, ni, ri: (bi, ni, ri, 0))
    in_specs = [per_head(acc), per_head(corr), per_head(lsum), per_head(m)]
    args = [acc, corr, lsum, m]
    if residual:
        in_specs += [per_row, per_head(k_res), per_head(v_res), full(res_lengths)]
        args += [qr, k_res, v_res, res_lengths.astype(jnp.int32)]
    out, lse = pl.pallas_call(
        functools.partial(
            _kernel,
            rows_p=rows_p,
            gv=gv,
            t=t,
            gq=rows_q // t,
            scale2=scale * math.log2(math.e),
            residual=residual,
            row_stride=row_stride,
        ),
        grid=(b, n, rows_q),
        in_specs=in_specs,
        out_specs=[per_row, pl.BlockSpec((None, None, None, 1), lambda bi, ni, ri: (bi, ni, ri, 0))],
        out_shape=[
            jax.ShapeDtypeStruct((b, n, rows_q, h), out_dtype),
            jax.ShapeDtypeStruct((b, n, rows_q, 1), jnp.float32),
        ],
        compiler_params=None if interpret else _compat.triton_params(num_warps, 1),
        interpret=interpret,
        name="kivi_merge_partials",
    )(*args)
    gq = rows_q // t
    out = out.reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n * gq, h)
    lse = lse.reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, n * gq)
    return out, lse
