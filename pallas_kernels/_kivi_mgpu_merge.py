"""The Hopper KIVI decode kernel's epilogue as one Triton-lowered Pallas kernel: the split-K
partials finished (value offset and zero points added back), the full-precision residual window
attended, and all of them merged through their maxima (Liu et al. 2024, KIVI,
https://arxiv.org/abs/2402.02750: quantized tokens plus a window of recent ones in full
precision). Its jnp reference is `_kivi_mgpu_epilogue.assemble` with `residual_partial`, which
XLA runs as about 15 small kernels (36 us of a 386 us call at 128k on an H200); this is one.

One program per (batch row, KV head): it reads every split at once (a loop over the splits paid
the load latency once per split: no faster than XLA), weighs them by their maxima (log2 units,
as the kernel keeps them) and adds the residual window as one more split.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat
from ._compat import pl

_FLOOR = -1e30  # the kernel's initial running max (log2 units): an empty split


def _kernel(acc_ref, corr_ref, lsum_ref, m_ref, *rest, rows_q, rows_p, n_gc, gv, t, gq, scale2, residual):
    # every split at once (a loop over them pays the load latency once per split); the rows_p
    # query rows side by side; channel c of value group g reads column g * rows_p + row
    cols = pl.ds(0, rows_p)
    mp = m_ref[:, 0, cols]  # [P, rows] (log2 units; equal on every tile row)
    lp = jnp.sum(lsum_ref[:, :, cols], axis=1)  # [P, rows]: the kernel keeps per-thread partial sums
    mx = jnp.max(mp, axis=0)
    w = jnp.exp2(mp - mx[None, :])  # empty splits (m = _FLOOR, l = 0) weigh nothing
    l = jnp.sum(w * lp, axis=0)
    parts = []  # per value group: [Gv, rows]
    for g in range(n_gc):
        gc = pl.ds(g * rows_p, rows_p)
        a = acc_ref[:, pl.ds(g * gv, gv), gc] + jnp.sum(corr_ref[:, :, gc], axis=1)[:, None, :]  # [P, Gv, rows]
        parts.append(jnp.sum(a * w[:, None, :], axis=0))
    row_vec = lax.broadcasted_iota(jnp.int32, (rows_p,), 0)  # (Triton lowers no slicing of values: masks pick rows)
    if residual:  # one more split: the window's scores per query row
        q_ref, k_ref, v_ref, rl_ref, out_ref, lse_ref = rest
        r = k_ref.shape[0]
        bi, ni = pl.program_id(0), pl.program_id(1)
        k = k_ref[...].astype(jnp.float32)
        slot = lax.broadcasted_iota(jnp.int32, (r,), 0)
        mr, lr, pr = jnp.full((rows_p,), _FLOOR), jnp.zeros((rows_p,)), []
        for j in range(rows_q):
            sc = jnp.sum(k * q_ref[j, :].astype(jnp.float32)[None, :], axis=1) * scale2
            seen = slot < rl_ref[bi, ni] - (t - 1 - j // gq)  # query t sees slots < res_len - (T - 1 - t)
            m_j = jnp.max(jnp.where(seen, sc, _FLOOR))
            pr.append(jnp.where(seen, jnp.exp2(sc - m_j), 0.0))
            mr, lr = jnp.where(row_vec == j, m_j, mr), jnp.where(row_vec == j, jnp.sum(pr[-1]), lr)
        mn = jnp.maximum(mx, mr)
        al, be = jnp.exp2(mx - mn), jnp.exp2(mr - mn)
        l = l * al + lr * be
        for g in range(n_gc):
            v = v_ref[:, pl.ds(g * gv, gv)].astype(jnp.float32)  # [R, Gv]
            o = parts[g] * al[None, :]
            for j in range(rows_q):
                be_j = jnp.sum(jnp.where(row_vec == j, be, 0.0))
                o = o + jnp.where(row_vec[None, :] == j, jnp.sum(v * pr[j][:, None], axis=0)[:, None] * be_j, 0.0)
            parts[g] = o
        mx = mn
    else:
        out_ref, lse_ref = rest
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    for g in range(n_gc):
        out_ref[:, pl.ds(g * gv, gv)] = (parts[g] / l_safe[None, :]).T.astype(out_ref.dtype)
    lse_ref[...] = jnp.where(seen, (mx + jnp.log2(l_safe)) * math.log(2.0), -jnp.inf)


def merge_partials(partials, qr, k_res=None, v_res=None, res_lengths=None, *, rows_q: int, rows_p: int, gv: int,
                   t: int, scale: float, out_dtype=jnp.bfloat16, num_warps: int = 8, interpret: bool = False):
    """partials (acc [B,N,P,H,NB], corr [B,N,P,64,NC], lsum and m [B,N,P,64,NS] float32: the
    kernel's per-split sums for rows_p padded query rows, `_kernel_partials`); qr [B,N,rows_q,H]
    the query rows (unpermuted, unpadded; `query_columns`); optional residual window k_res/v_res
    [B,N,R,H] with res_lengths [B,N] (<= R). Returns (out [B, T, N*Gq, H] out_dtype, lse
    [B, T, N*Gq] float32), rows ordered (t, query head of the group) as `assemble` does. H, Gv,
    P, rows_p and R must be powers of two (Triton blocks)."""
    acc, corr, lsum, m = partials
    b, n, splits, h, _ = acc.shape
    residual = k_res is not None
    sizes = (("head_dim H", h), ("value group Gv", gv), ("splits P", splits), ("padded query rows", rows_p))
    for name, val in sizes + ((("residual window R", k_res.shape[2]),) if residual else ()):
        if val & (val - 1):
            raise ValueError(f"{name}={val} must be a power of two for the Triton merge of the KIVI partials")
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    per_head = lambda a: pl.BlockSpec((None, None, *a.shape[2:]), lambda bi, ni: (bi, ni) + (0,) * (a.ndim - 2))  # noqa: E731
    in_specs = [per_head(acc), per_head(corr), per_head(lsum), per_head(m)]
    args = [acc, corr, lsum, m]
    if residual:
        qp = jnp.pad(qr, ((0, 0), (0, 0), (0, rows_p - rows_q), (0, 0))) if rows_p > rows_q else qr
        in_specs += [per_head(qp), per_head(k_res), per_head(v_res), full(res_lengths)]
        args += [qp, k_res, v_res, res_lengths.astype(jnp.int32)]
    out, lse = pl.pallas_call(
        functools.partial(_kernel, rows_q=rows_q, rows_p=rows_p, n_gc=h // gv, gv=gv, t=t, gq=rows_q // t,
                          scale2=scale * math.log2(math.e), residual=residual),
        grid=(b, n),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, rows_p, h), lambda bi, ni: (bi, ni, 0, 0)),
                   pl.BlockSpec((None, None, rows_p), lambda bi, ni: (bi, ni, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, n, rows_p, h), out_dtype),
                   jax.ShapeDtypeStruct((b, n, rows_p), jnp.float32)],
        compiler_params=None if interpret else _compat.triton_params(num_warps, 1),
        interpret=interpret,
        name="kivi_merge_partials",
    )(*args)
    if rows_p > rows_q:
        out, lse = out[:, :, :rows_q], lse[:, :, :rows_q]
    gq = rows_q // t
    out = out.reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n * gq, h)
    lse = lse.reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, n * gq)
    return out, lse
