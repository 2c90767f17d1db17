"""Mosaic TPU version of sparse decode attention (`sparse_decode_attention.py` holds the
semantics, the Triton kernel, the jnp reference and the dispatch table that calls this one for
backend="mosaic_tpu"; this file only the TPU kernel).

q [B, T, Nq, H]; k, v [B, N, S, H] (blocks of `block_size` tokens); block_indices [B, N, K];
block_counts [B, N]; lengths [B, N]; optionally slot positions k_pos [B, N, S], query positions
q_pos [B, T] and a local `window` (a selected valid slot is visible to query t only where
0 <= k_pos <= q_pos[t] and q_pos[t] - k_pos < window). Returns (out [B, T, Nq, H], lse
[B, T, Nq] float32).

Grid (B, N, K), the K axis "arbitrary": step j of (row, KV head) attends to its j-th selected
block, carrying the online-softmax state (m, l, acc) in VMEM scratch. The block numbers are
scalar-prefetched into SMEM so the k/v BlockSpec index_map DMAs only the selected blocks.
Before the kernel (a few integer ops on [B, N, K]) the selection is cleaned to what the
reference means: entries past `block_counts`, negative, or starting at or past the length
(so also past the cache) are dropped, duplicates count once (the Triton kernel clamps
out-of-range numbers and counts a duplicate twice), and the rest is sorted (sequential reads) and
packed to the front; steps past the kept count repeat the last kept block number (the
pipeline sees an unchanged block index and issues no DMA) and are skipped with `pl.when`.
GQA: the T * Gq query rows of one KV head are the rows of one tile (`group_rows`), padded
to a multiple of 8 sublanes. With positions, the k_pos block of each selected block rides
along as a [1, block_size] lane row and the query positions as a [rows, 1] column.

Shapes: block_size must be a multiple of 8 (sublane tiling; 16 suits bfloat16 better).
On a real TPU head_dim should be a multiple of 128 (lane tiling); smaller head dims
(e.g. 32, 64) run in interpret mode, which is what the CPU tests use. Checked in the TPU
interpreter (`interpret=True`) and lowered to Mosaic from CPU; not compiled for or run on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat
from ._compat import pl
from ._decode_common import (
    check_positions,
    check_sparse_inputs,
    clean_selection,
    group_rows,
    per_head,
    scratch_finish,
    scratch_init,
    scratch_update,
    ungroup_rows,
)


def _kernel(
    idx_ref,
    cnt_ref,
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    *rest,
    bs: int,
    kk: int,
    n: int,
    scale: float,
    positions: bool,
    window: int | None,
):
    if positions:
        kp_ref, qp_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    else:
        o_ref, lse_ref, m_scr, l_scr, acc_scr = rest
    bi, ni, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bn = bi * n + ni

    @pl.when(j == 0)
    def _init():
        scratch_init(m_scr, l_scr, acc_scr)

    @pl.when(j < cnt_ref[bn])
    def _block():
        q = q_ref[...]  # [rows, H]
        k = k_ref[...].astype(q.dtype)  # [bs, H]
        v = v_ref[...].astype(q.dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        kpos = idx_ref[bn * kk + j] * bs + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        vis = kpos < len_ref[bn]
        if positions:
            kp = kp_ref[...]  # [1, bs] slot positions (-1 = empty)
            qp = qp_ref[...]  # [rows, 1] query position of each row (-1 = padding)
            vis &= (kp >= 0) & (qp >= 0) & (kp <= qp)
            if window is not None:
                vis &= (qp - kp) < window
        s = jnp.where(vis, s, -jnp.inf)
        scratch_update(m_scr, l_scr, acc_scr, s, v)

    @pl.when(j == kk - 1)
    def _finish():
        scratch_finish(m_scr, l_scr, acc_scr, o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "window", "interpret"))
def _sparse_decode_tpu_jit(
    q, k, v, block_indices, counts, lengths, k_pos=None, q_pos=None, *, block_size, scale, window=None, interpret
):
    pltpu = _compat.pltpu
    b, t, _nq, h = q.shape
    n, s = k.shape[1], k.shape[2]
    kk = block_indices.shape[2]
    idx, kept = clean_selection(block_indices, counts, lengths, block_size=block_size, num_blocks=s // block_size)
    qr, rows = group_rows(q, n)
    rows_p = -(-rows // 8) * 8
    qr = qr[:, :, :rows_p]

    def kv_map(bi, ni, j, idx_ref, cnt_ref, len_ref):
        return bi, ni, idx_ref[(bi * n + ni) * kk + j], 0

    def row_map(bi, ni, j, *_):
        return bi, ni, 0, 0

    positions = k_pos is not None
    extra, extra_specs = [], []
    if positions:  # k_pos as [.., S/bs, 1, bs] (a block = full last two dims); q position per grouped row
        qrow = jnp.repeat(q_pos.astype(jnp.int32), rows // t, axis=1)
        extra = [
            k_pos.astype(jnp.int32).reshape(b, n, s // block_size, 1, block_size),
            jnp.pad(qrow, ((0, 0), (0, rows_p - rows)), constant_values=-1)[..., None],
        ]
        extra_specs = [
            pl.BlockSpec((None, None, None, 1, block_size), lambda *a: kv_map(*a) + (0,)),
            pl.BlockSpec((None, rows_p, 1), lambda bi, ni, j, *_: (bi, 0, 0)),
        ]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, n, kk),
        in_specs=[
            pl.BlockSpec((None, None, rows_p, h), row_map),
            pl.BlockSpec((None, None, block_size, h), kv_map),
            pl.BlockSpec((None, None, block_size, h), kv_map),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows_p, h), row_map),
            pl.BlockSpec((None, None, rows_p, 1), row_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((rows_p, 1), jnp.float32),
            pltpu.VMEM((rows_p, 1), jnp.float32),
            pltpu.VMEM((rows_p, h), jnp.float32),
        ],
    )
    out, lse = pl.pallas_call(
        functools.partial(_kernel, bs=block_size, kk=kk, n=n, scale=scale, positions=positions, window=window),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, n, rows_p, h), q.dtype),
            jax.ShapeDtypeStruct((b, n, rows_p, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_compat.tpu_interpret_params() if interpret else False,
        name="sparse_decode_attention_tpu",
    )(idx.reshape(-1), kept.reshape(-1), lengths.reshape(-1), qr, k, v, *extra)
    return ungroup_rows(out, lse[..., 0], t, rows)


def sparse_decode_attention_tpu(
    q,
    k,
    v,
    block_indices,
    lengths,
    *,
    block_size: int,
    block_counts=None,
    scale: float | None = None,
    k_pos=None,
    q_pos=None,
    window: int | None = None,
    interpret: bool = False,
):
    """Mosaic TPU sparse decode attention (module docstring); `interpret=True` runs it in the
    TPU interpreter. Returns (out [B, T, Nq, H] q.dtype, lse [B, T, Nq] float32)."""
    b, t, _nq, h, n, s = check_sparse_inputs(q, k, v, block_indices, block_size)
    check_positions(k_pos, q_pos, b, t, n, s, window)
    if block_size % 8:
        raise ValueError(f"block_size={block_size} must be a multiple of 8 for the mosaic_tpu backend")
    kk = block_indices.shape[2]
    if kk == 0:
        raise ValueError(f"block_indices shape {block_indices.shape} selects no block (K=0)")
    counts = jnp.full((b, n), kk, jnp.int32) if block_counts is None else per_head(block_counts, b, n, "block_counts")
    lengths = per_head(lengths, b, n, "lengths")
    scale = float(h**-0.5 if scale is None else scale)
    return _sparse_decode_tpu_jit(
        q,
        k,
        v,
        block_indices,
        counts,
        lengths,
        k_pos,
        q_pos,
        block_size=block_size,
        scale=scale,
        window=window,
        interpret=interpret,
    )


__all__ = ["sparse_decode_attention_tpu"]
