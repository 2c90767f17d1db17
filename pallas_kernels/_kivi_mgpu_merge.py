"""The Hopper KIVI decode kernel's epilogue as one Triton-lowered Pallas kernel: the split-K
partials finished (value offset and zero points added back), the full-precision residual window
attended, and all of them merged through their maxima (Liu et al. 2024, KIVI,
https://arxiv.org/abs/2402.02750: quantized tokens plus a window of recent ones in full
precision). Its jnp reference is `_kivi_mgpu_epilogue.assemble` with `residual_partial`, which
XLA runs as 15 small kernels (37 us of GPU time a call at 128k, B8 Hkv8, on an H200, plus the
gaps between launches); this one took 13-16 us there at 16 splits (BENCHMARKS.md, "Decode").

One program per (batch row, KV head, query row): it reads its column of every split at once (a
gather; a loop over the splits paid the load latency once per split, and a program per (batch
row, KV head) many small reductions: neither was faster than XLA), weighs the splits by their
maxima (log2 units, as the kernel keeps them) and adds the residual window as one more split.
What it still wastes: the kernel leaves its column sums (corr, lsum) per thread, on 64 rows, so
each program reads its (row, KV head)'s whole blocks; reduced in the kernel they would be 16x
smaller.
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


def _kernel(acc_ref, corr_ref, lsum_ref, m_ref, *rest, rows_p, gv, t, gq, scale2, residual):
    row = pl.program_id(2)
    splits, h, _ = acc_ref.shape
    # every split at once (a loop over them pays the load latency once per split; many small
    # reductions pay a barrier each): channel c of value group g reads column g * rows_p + row
    mp = m_ref[:, 0, row]  # [P] (log2 units; equal on every tile row)
    lp = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (1, lsum_ref.shape[-1]), 1) == row,
                           jnp.sum(lsum_ref[...], axis=1), 0.0), axis=1)  # [P]
    mx = jnp.max(mp)
    w = jnp.exp2(mp - mx)  # empty splits (m = _FLOOR, l = 0) weigh nothing
    l = jnp.sum(w * lp)
    p_idx = lax.broadcasted_iota(jnp.int32, (splits, h), 0)
    h_idx = lax.broadcasted_iota(jnp.int32, (splits, h), 1)
    col = (h_idx // gv) * rows_p + row  # [P, H]
    colsum = jnp.sum(corr_ref[...], axis=1)  # [P, NC]
    corr_col = lax.broadcasted_iota(jnp.int32, (1, corr_ref.shape[-1]), 1)
    c = jnp.zeros((splits, h), jnp.float32)
    for g in range(h // gv):  # the group's column sum, for each of its channels
        c_g = jnp.sum(jnp.where(corr_col == g * rows_p + row, colsum, 0.0), axis=1)  # [P]
        c = jnp.where(h_idx // gv == g, c_g[:, None], c)
    o = jnp.sum((acc_ref[p_idx, h_idx, col] + c) * w[:, None], axis=0)  # [H]
    if residual:  # one more split
        q_ref, k_ref, v_ref, rl_ref, out_ref, lse_ref = rest
        r = k_ref.shape[0]
        bi, ni = pl.program_id(0), pl.program_id(1)
        sc = jnp.sum(k_ref[...].astype(jnp.float32) * q_ref[...].astype(jnp.float32)[None, :], axis=1) * scale2
        rl = jnp.minimum(rl_ref[bi, ni] if len(rl_ref.shape) == 2 else rl_ref[bi], r)  # clipped to R first
        seen = lax.broadcasted_iota(jnp.int32, (r,), 0) < rl - (t - 1 - row // gq)  # query t sees
        mr = jnp.max(jnp.where(seen, sc, _FLOOR))  # slots < res_len - (T - 1 - t)
        pr = jnp.where(seen, jnp.exp2(sc - mr), 0.0)
        mn = jnp.maximum(mx, mr)
        al, be = jnp.exp2(mx - mn), jnp.exp2(mr - mn)
        l = l * al + jnp.sum(pr) * be
        o = o * al + jnp.sum(v_ref[...].astype(jnp.float32) * pr[:, None], axis=0) * be
        mx = mn
    else:
        out_ref, lse_ref = rest
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    out_ref[...] = (o / l_safe).astype(out_ref.dtype)
    lse_ref[...] = jnp.full((1,), jnp.where(seen, (mx + jnp.log2(l_safe)) * math.log(2.0), -jnp.inf))


def merge_partials(partials, qr, k_res=None, v_res=None, res_lengths=None, *, rows_q: int, rows_p: int, gv: int,
                   t: int, scale: float, out_dtype=jnp.bfloat16, num_warps: int = 4, interpret: bool = False):
    """partials (acc [B,N,P,H,NB], corr [B,N,P,64,NC], lsum and m [B,N,P,64,NS] float32: the
    kernel's per-split sums for rows_p padded query rows, `_kernel_partials`); qr [B,N,rows_q,H]
    the query rows (unpermuted, unpadded; `query_columns`); optional residual window k_res/v_res
    [B,N,R,H] with res_lengths [B] or [B,N]. Returns (out [B, T, N*Gq, H] out_dtype, lse
    [B, T, N*Gq] float32), rows ordered (t, query head of the group) as `assemble` does. H, P,
    NS, NC and R must be powers of two (Triton blocks)."""
    acc, corr, lsum, m = partials
    b, n, splits, h, _ = acc.shape
    residual = k_res is not None
    sizes = (("head_dim H", h), ("splits P", splits), ("score columns NS", lsum.shape[-1]),
             ("correction columns NC", corr.shape[-1]))
    for name, val in sizes + ((("residual window R", k_res.shape[2]),) if residual else ()):
        if val & (val - 1):
            raise ValueError(f"{name}={val} must be a power of two for the Triton merge of the KIVI partials")
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)  # noqa: E731
    per_head = lambda a: pl.BlockSpec((None, None, *a.shape[2:]), lambda bi, ni, ri: (bi, ni) + (0,) * (a.ndim - 2))  # noqa: E731
    per_row = pl.BlockSpec((None, None, None, h), lambda bi, ni, ri: (bi, ni, ri, 0))
    in_specs = [per_head(acc), per_head(corr), per_head(lsum), per_head(m)]
    args = [acc, corr, lsum, m]
    if residual:
        in_specs += [per_row, per_head(k_res), per_head(v_res), full(res_lengths)]
        args += [qr, k_res, v_res, res_lengths.astype(jnp.int32)]
    out, lse = pl.pallas_call(
        functools.partial(_kernel, rows_p=rows_p, gv=gv, t=t, gq=rows_q // t, scale2=scale * math.log2(math.e),
                          residual=residual),
        grid=(b, n, rows_q),
        in_specs=in_specs,
        out_specs=[per_row, pl.BlockSpec((None, None, None, 1), lambda bi, ni, ri: (bi, ni, ri, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, n, rows_q, h), out_dtype),
                   jax.ShapeDtypeStruct((b, n, rows_q, 1), jnp.float32)],
        compiler_params=None if interpret else _compat.triton_params(num_warps, 1),
        interpret=interpret,
        name="kivi_merge_partials",
    )(*args)
    gq = rows_q // t
    out = out.reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n * gq, h)
    lse = lse.reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, n * gq)
    return out, lse
