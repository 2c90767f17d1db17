"""Sparse decode attention: each (row, KV head) reads only the KV blocks it selected (Quest,
Tang et al. 2024, https://arxiv.org/abs/2406.10774; ShadowKV / retrieval heads alike).

q [B, T, Nq, H] (one or a few tokens, Nq = N * Gq); cache k, v [B, N, S, H] (kvjax's
heads-major layout) cut into blocks of `block_size` tokens; block_indices [B, N, K] int32
selected block numbers, of which the first `block_counts` [B, N] are used (default all K);
`lengths` [B] or [B, N] valid tokens (slots at or past it are masked, also inside a selected
block). Every query row sees every selected valid token. The K selections are split over
`num_splits` programs whose partial results merge through their LSEs.
Optionally (kvjax's position-masked caches) `k_pos` [B, N, S] int32 and `q_pos` [B, T] int32 with
an optional local `window`: a selected slot is then visible to query t only where
0 <= k_pos <= q_pos[t] (and q_pos[t] - k_pos < window) -- `kvjax.attention`'s visibility rule, so
an evicted, merged or re-ordered cache needs no prefix check (the positions ride along: 4 bytes
per slot next to 2 * H * itemsize of K and V).
Returns (out [B, T, Nq, H], lse [B, T, Nq] float32; -inf and 0 where nothing was selected).

Backends (`backend=`, `_compat` has the vocabulary): "triton" (every CUDA GPU; "mosaic_gpu" runs
it too, and `interpret=True` runs it on CPU), "mosaic_tpu" (a grid over the selected blocks with
scalar-prefetched block numbers: `sparse_decode_attention_tpu.py`; `block_sizes` does not apply;
`interpret=True` runs it in the TPU interpreter) and "reference" (the jnp reference), each an
entry of one dispatch table (`_BACKENDS`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat
from ._compat import pl
from ._decode_common import (
    FLOAT_DTYPES,
    check_positions,
    check_sparse_inputs,
    clean_selection,
    finish,
    group_rows,
    init_carry,
    masked_softmax,
    merge_splits,
    online_update,
    per_head,
    ungroup_rows,
)
from .sparse_decode_attention_tpu import sparse_decode_attention_tpu

SUPPORTED_DTYPES = FLOAT_DTYPES

__all__ = [
    "SUPPORTED_DTYPES",
    "SparseDecodeBlockSizes",
    "sparse_decode_attention",
    "sparse_decode_attention_reference",
]


@dataclasses.dataclass(frozen=True, slots=True)
class SparseDecodeBlockSizes:
    """Tuning knobs of the Triton kernel (static). num_splits: programs per (row, KV head) over
    the K selected blocks (None = auto); num_warps, num_stages: Triton compiler parameters."""

    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, backend: str = "triton") -> SparseDecodeBlockSizes:
        return cls()


def sparse_decode_attention_reference(
    q, k, v, block_indices, lengths, *, block_size, block_counts=None, scale=None, k_pos=None, q_pos=None, window=None
):
    """Gather-free jnp reference: a [B, N, S] visibility mask from the selected blocks."""
    b, t, nq, h, n, s = check_sparse_inputs(q, k, v, block_indices, block_size)
    check_positions(k_pos, q_pos, b, t, n, s)
    g = nq // n
    scale = h**-0.5 if scale is None else scale
    kk = block_indices.shape[2]
    counts = jnp.full((b, n), kk, jnp.int32) if block_counts is None else per_head(block_counts, b, n, "block_counts")
    used = jnp.arange(kk)[None, None, :] < counts[..., None]
    blk_of = jnp.arange(s) // block_size
    sel = jnp.any((block_indices[..., None, :] == blk_of[None, None, :, None]) & used[..., None, :], axis=-1)
    vis = sel & (jnp.arange(s)[None, None, :] < per_head(lengths, b, n, "lengths")[..., None])  # [B,N,S]
    vis = jnp.broadcast_to(vis[:, :, None, :], (b, n, t, s))
    if k_pos is not None:
        kp, qp = k_pos[:, :, None, :], q_pos[:, None, :, None]
        ok = (kp >= 0) & (qp >= 0) & (kp <= qp)
        if window is not None:
            ok &= (qp - kp) < window
        vis = vis & ok
    qg = q.astype(jnp.float32).reshape(b, t, n, g, h)
    logits = jnp.einsum("btngh,bnsh->bngts", qg, k.astype(jnp.float32), precision="highest") * scale
    logits = jnp.where(vis[:, :, None], logits, -jnp.inf)
    p, lse = masked_softmax(logits)
    out = jnp.einsum("bngts,bnsh->btngh", p, v.astype(jnp.float32), precision="highest")
    return out.reshape(b, t, nq, h).astype(q.dtype), jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, nq)


def _kernel(idx_ref, cnt_ref, len_ref, q_ref, k_ref, v_ref, *rest, bs, per_split, scale, positions, window):
    if positions:
        kp_ref, qp_ref, o_ref, lse_ref = rest
    else:
        o_ref, lse_ref = rest
    bi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    q = q_ref[...]
    rows, h = q.shape
    length = len_ref[bi, ni]
    first = si * per_split
    n_here = jnp.clip(cnt_ref[bi, ni] - first, 0, per_split)
    qp = qp_ref[...][:, None] if positions else None  # [rows, 1] query position of each row (-1 = padding)

    def body(j, carry):
        start = idx_ref[bi, ni, first + j] * bs
        k = k_ref[pl.ds(start, bs), :].astype(q.dtype)
        v = v_ref[pl.ds(start, bs), :].astype(q.dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        slot = start + lax.broadcasted_iota(jnp.int32, (rows, bs), 1)
        vis = slot < length
        if positions:
            kp = kp_ref[pl.ds(start, bs)][None, :]
            vis &= (kp >= 0) & (qp >= 0) & (kp <= qp)
            if window is not None:
                vis &= (qp - kp) < window
        return online_update(carry, jnp.where(vis, s, -jnp.inf), v)

    finish(lax.fori_loop(0, n_here, body, init_carry(rows, h)), o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("block_size", "scale", "bsz", "interpret", "window", "clean"))
def _sparse_decode_jit(
    q,
    k,
    v,
    block_indices,
    block_counts,
    lengths,
    k_pos,
    q_pos,
    *,
    block_size,
    scale,
    bsz,
    interpret,
    window,
    clean=False,
):
    b, t, _nq, h = q.shape
    n, s = k.shape[1], k.shape[2]
    kk = block_indices.shape[2]
    splits = bsz.num_splits or max(1, min(kk, (132 * 4) // max(b * n, 1)))
    per_split = -(-kk // splits)
    qr, rows = group_rows(q, n)
    rows_p = qr.shape[2]
    if clean:  # the caller promises distinct in-range blocks
        idx = jnp.clip(block_indices.astype(jnp.int32), 0, s // block_size - 1)
    else:  # the reference's meaning: drop out-of-range and repeated blocks (a repeat would count twice)
        idx, block_counts = clean_selection(
            block_indices, block_counts, lengths, block_size=block_size, num_blocks=s // block_size
        )
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, splits * per_split - kk)))
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
    positions = k_pos is not None
    extra, extra_specs = [], []
    if positions:  # q position of each grouped row (row = t * Gq + g; padding rows -1)
        qrow = jnp.repeat(q_pos.astype(jnp.int32), rows // t, axis=1)
        extra = [k_pos.astype(jnp.int32), jnp.pad(qrow, ((0, 0), (0, rows_p - rows)), constant_values=-1)]
        extra_specs = [
            pl.BlockSpec((None, None, s), lambda bi, ni, si: (bi, ni, 0)),
            pl.BlockSpec((None, rows_p), lambda bi, ni, si: (bi, 0)),
        ]
    o, lse = pl.pallas_call(
        functools.partial(_kernel, bs=block_size, per_split=per_split, scale=scale, positions=positions, window=window),
        grid=(b, n, splits),
        in_specs=[
            full(idx),
            full(block_counts),
            full(lengths),
            pl.BlockSpec((None, None, rows_p, h), lambda bi, ni, si: (bi, ni, 0, 0)),
            pl.BlockSpec((None, None, s, h), lambda bi, ni, si: (bi, ni, 0, 0)),
            pl.BlockSpec((None, None, s, h), lambda bi, ni, si: (bi, ni, 0, 0)),
            *extra_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows_p, h), lambda bi, ni, si: (bi, ni, si, 0, 0)),
            pl.BlockSpec((None, None, None, rows_p), lambda bi, ni, si: (bi, ni, si, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, n, splits, rows_p, h), jnp.float32),
            jax.ShapeDtypeStruct((b, n, splits, rows_p), jnp.float32),
        ],
        compiler_params=None if interpret else _compat.triton_params(bsz.num_warps, bsz.num_stages),
        interpret=interpret,
        name="sparse_decode_attention",
    )(idx, block_counts, lengths, qr, k, v, *extra)
    out, lse = ungroup_rows(*merge_splits(o, lse), t, rows)
    return out.astype(q.dtype), lse


def _reference(q, k, v, block_indices, lengths, *, block_sizes, selection_is_clean, interpret, **kw):
    del block_sizes, selection_is_clean, interpret  # the jnp reference has no tuning knobs
    return sparse_decode_attention_reference(q, k, v, block_indices, lengths, **kw)


def _tpu(q, k, v, block_indices, lengths, *, block_sizes, selection_is_clean, **kw):
    del block_sizes, selection_is_clean  # the TPU kernel cleans every selection (its docstring)
    return sparse_decode_attention_tpu(q, k, v, block_indices, lengths, **kw)


def _triton(
    q,
    k,
    v,
    block_indices,
    lengths,
    *,
    block_size,
    block_counts,
    scale,
    k_pos,
    q_pos,
    window,
    block_sizes,
    selection_is_clean,
    interpret,
):
    """The Triton kernel (module doc): checks its shape constraints, then runs it."""
    b, _t, _nq, h, n, _s = check_sparse_inputs(q, k, v, block_indices, block_size)
    for name, val in (("block_size", block_size), ("head_dim", h)):
        if val < 16 or val & (val - 1):
            raise ValueError(f"{name}={val} must be a power of two >= 16 for the triton backend")
    kk = block_indices.shape[2]
    counts = jnp.full((b, n), kk, jnp.int32) if block_counts is None else per_head(block_counts, b, n, "block_counts")
    lengths = per_head(lengths, b, n, "lengths")
    scale = float(h**-0.5 if scale is None else scale)
    return _sparse_decode_jit(
        q,
        k,
        v,
        block_indices,
        jnp.minimum(counts, kk),
        lengths,
        k_pos,
        q_pos,
        block_size=block_size,
        scale=scale,
        bsz=block_sizes or SparseDecodeBlockSizes.get_default("triton"),
        interpret=interpret,
        window=window,
        clean=selection_is_clean,
    )


# backend -> implementation ("mosaic_gpu" runs the Triton kernel)
_BACKENDS = {"triton": _triton, "mosaic_gpu": _triton, "mosaic_tpu": _tpu, "reference": _reference}


def sparse_decode_attention(
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
    block_sizes: SparseDecodeBlockSizes | None = None,
    selection_is_clean: bool = False,
    backend: str | None = None,
    interpret: bool = False,
):
    """See module docstring. Returns (out [B, T, Nq, H], lse [B, T, Nq] float32).

    Block numbers that are repeated, negative or past the last block are dropped, as in the
    reference (a sort per (row, head)); `selection_is_clean=True` skips that pass when the
    caller knows the list is distinct and in range (e.g. every block, in order). backend: one of
    `_compat.KERNEL_BACKENDS` or None (by device)."""
    b, t, _nq, _h, n, s = check_sparse_inputs(q, k, v, block_indices, block_size)
    check_positions(k_pos, q_pos, b, t, n, s, window)
    backend = _compat.resolve_backend(backend, interpret, tuple(_BACKENDS))
    return _BACKENDS[backend](
        q,
        k,
        v,
        block_indices,
        lengths,
        block_size=block_size,
        block_counts=block_counts,
        scale=scale,
        k_pos=k_pos,
        q_pos=q_pos,
        window=window,
        block_sizes=block_sizes,
        selection_is_clean=selection_is_clean,
        interpret=interpret,
    )
