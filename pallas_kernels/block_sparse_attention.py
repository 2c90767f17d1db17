"""Block-sparse flash attention for prefill and chunks (FlashAttention-2 online softmax over
the key blocks a mask leaves visible; Dao 2023, https://arxiv.org/abs/2307.08691; block
metadata as in splash attention).

Layout like `jax.nn.dot_product_attention`: q [B, T, Nq, H], k/v [B, S, N, H] with Nq = N * G
(GQA). Returns `(out [B, T, Nq, H], lse [B, T, Nq] float32)`; lse is the natural-log
log-sum-exp of the scaled logits (-inf, with out = 0, for a row that sees no key), so partial
results over disjoint key sets merge with `kvjax.attention.merge_partials`.

Backends (`backend=`, `_compat` has the vocabulary): "mosaic_gpu" (Hopper, warp-specialised
TMA + wgmma kernel in `block_sparse_attention_mgpu.py`), "triton" (any CUDA GPU; also the kernel
run by `interpret=True` on CPU), "mosaic_tpu" (grid over key blocks with scalar-prefetched block
indices; `interpret=True` runs it in the TPU interpreter) and "reference" (the jnp reference);
`None` picks by the default device (`_compat.backend_kind`). The Pallas lowerings are the
entries of one dispatch table (`_KERNELS`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _compat
from ._compat import pl
from ._decode_common import NEG_INIT, scratch_finish, scratch_init, scratch_update
from .block_mask import BlockMetadata, MaskSpec, build_block_metadata, check_block_mask
from .block_sparse_attention_mgpu import mgpu_block_sparse_attention

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
    """Tile sizes (static). On mosaic_gpu `block_q` is per compute warpgroup and a CTA
    handles 2 * block_q query rows; `num_stages` is then the TMA pipeline depth."""

    block_q: int = 64
    block_kv: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, backend: str = "triton") -> BlockSizes:
        if backend == "mosaic_gpu":
            return cls(block_q=64, block_kv=128, num_warps=4, num_stages=2)
        if backend == "mosaic_tpu":
            return cls(block_q=128, block_kv=128)
        return cls(block_q=64, block_kv=64, num_warps=4, num_stages=2)

    def meta_block_q(self, backend: str) -> int:
        """Query rows that share one key-block list."""
        return 2 * self.block_q if backend == "mosaic_gpu" else self.block_q


def _check_inputs(q, k, v, kv_lengths, backend, block_sizes: BlockSizes):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected q [B,T,Nq,H], k/v [B,S,N,H]; got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
    b, t, nq, h = q.shape
    _, s, n, hk = k.shape
    if k.shape[0] != b or hk != h:
        raise ValueError(f"q{q.shape} and k{k.shape} must agree on batch and head_dim")
    if nq % n:
        raise ValueError(f"query heads {nq=} must be a multiple of key/value heads {n=}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v dtypes must match; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not any(q.dtype == d for d in SUPPORTED_DTYPES):
        raise ValueError(f"dtype={q.dtype} is not supported; expected one of float32, bfloat16, float16")
    if backend == "mosaic_gpu" and q.dtype == jnp.float32:
        raise ValueError(f"dtype={q.dtype} is not supported on mosaic_gpu (wgmma); use bfloat16 or float16")
    mbq = block_sizes.meta_block_q(backend)
    if t % mbq:
        raise ValueError(f"q_len={t} must be a multiple of the query block {mbq} ({block_sizes=}, {backend=})")
    if s % block_sizes.block_kv:
        raise ValueError(f"kv_len={s} must be a multiple of block_kv={block_sizes.block_kv}")
    if backend == "triton":
        for name, val in (("block_q", block_sizes.block_q), ("block_kv", block_sizes.block_kv), ("head_dim", h)):
            if val < 16 or val & (val - 1):
                raise ValueError(f"{name}={val} must be a power of two >= 16 for the triton backend")
    if backend == "mosaic_gpu" and (h % 64 or block_sizes.block_q % 64 or block_sizes.block_kv % 64):
        raise ValueError(
            f"head_dim={h}, block_q={block_sizes.block_q}, block_kv={block_sizes.block_kv} must be multiples of 64 on mosaic_gpu"
        )
    if kv_lengths is not None and (kv_lengths.shape != (b,) or not jnp.issubdtype(kv_lengths.dtype, jnp.integer)):
        raise ValueError(
            f"kv_lengths must be an integer array of shape [B]=({b},); got {kv_lengths.dtype}{kv_lengths.shape}"
        )


def _element_visible(qpos, kpos, length, spec: MaskSpec, has_lengths: bool):
    vis = None

    def _and(a, b):
        return b if a is None else a & b

    if has_lengths:
        vis = _and(vis, kpos < length)
    if spec.causal:
        vis = _and(vis, kpos <= qpos)
    if spec.window is not None:
        vis = _and(vis, (qpos - kpos) < spec.window)
    return vis


# ----------------------------------------------------------------------------- reference


def block_sparse_attention_reference(
    q, k, v, *, mask: MaskSpec = MaskSpec(), block_mask=None, kv_lengths=None, scale=None, q_chunk: int = 512
):
    """Exact attention in float32 jnp with the same mask semantics (the XLA fallback).

    q [B, T, Nq, H], k/v [B, S, N, H], kv_lengths [B] | None -> (out [B,T,Nq,H] q.dtype,
    lse [B,T,Nq] f32). Processes `q_chunk` query rows at a time."""
    b, t, nq, h = q.shape
    s, n = k.shape[1], k.shape[2]
    g = nq // n
    scale = h**-0.5 if scale is None else scale
    bm = None
    if block_mask is not None:
        bm = jnp.asarray(check_block_mask(mask, block_mask, t, s))  # [Hm, nqb_m, nkb_m]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    kpos = jnp.arange(s)
    lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)

    def chunk(qc, rows):  # qc [B, c, Nq, H], rows [c]
        qg = qc.astype(jnp.float32).reshape(b, -1, n, g, h)
        logits = jnp.einsum("btngh,bsnh->bngts", qg, kf, precision="highest") * scale
        vis = _element_visible(rows[:, None] + mask.q_offset, kpos[None, :], None, mask, False)
        vis = jnp.ones((rows.shape[0], s), bool) if vis is None else vis
        vis = vis[None, None, None]  # [1,1,1,c,S]
        if bm is not None:
            rq, rk = mask.mask_block
            blk = bm[:, rows // rq][:, :, kpos // rk]  # [Hm, c, S]
            vis = vis & (blk.reshape(n, g, *blk.shape[1:]) if blk.shape[0] > 1 else blk[None])[None]
        if lengths is not None:
            vis = vis & (kpos[None, :] < lengths[:, None])[:, None, None, None, :]
        logits = jnp.where(vis, logits, -jnp.inf)
        m = jnp.max(logits, axis=-1, keepdims=True)
        seen = jnp.isfinite(m)
        p = jnp.exp(logits - jnp.where(seen, m, 0.0))
        l = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("bngts,bsnh->btngh", p / jnp.where(seen, l, 1.0), vf, precision="highest")
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]  # [B,N,G,c]
        return out.reshape(b, -1, nq, h).astype(q.dtype), jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, -1, nq)

    rows_all = jnp.arange(t)
    if t <= q_chunk or t % q_chunk:
        return chunk(q, rows_all)
    qs = q.reshape(b, t // q_chunk, q_chunk, nq, h).swapaxes(0, 1)
    outs, lses = lax.map(lambda a: chunk(a[0], a[1]), (qs, rows_all.reshape(-1, q_chunk)))
    return outs.swapaxes(0, 1).reshape(b, t, nq, h), lses.swapaxes(0, 1).reshape(b, t, nq)


# ----------------------------------------------------------------------------- triton / generic


def _generic_kernel(
    cnt_ref,
    idx_ref,
    flg_ref,
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    spec: MaskSpec,
    scale: float,
    bq: int,
    bk: int,
    per_head: bool,
    has_lengths: bool,
):
    bi, hi, qi = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    hs = hi if per_head else 0
    length = len_ref[bi]
    cnt = cnt_ref[bi, hs, qi]
    q = q_ref[...]
    h = q.shape[-1]
    masked = spec.causal or spec.window is not None or has_lengths
    qpos = qi * bq + spec.q_offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)

    def body(j, carry):
        acc, m, l = carry
        start = idx_ref[hs, qi, j] * bk
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if masked:
            kpos = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            vis = _element_visible(qpos, kpos, length, spec, has_lengths)
            s = jnp.where(vis, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return acc * alpha[:, None] + pv, m_new, l

    init = (jnp.zeros((bq, h), jnp.float32), jnp.full((bq,), NEG_INIT, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, cnt, body, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _generic_call(q, k, v, meta, lengths, *, spec, scale, bs: BlockSizes, has_lengths, interpret):
    b, t, nq, h = q.shape
    s, n = k.shape[1], k.shape[2]
    g = nq // n
    counts, indices, partial = meta
    per_head = indices.shape[0] > 1
    bq, bk = bs.block_q, bs.block_kv
    kernel = functools.partial(
        _generic_kernel, spec=spec, scale=scale, bq=bq, bk=bk, per_head=per_head, has_lengths=has_lengths
    )
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, nq, t // bq),
        in_specs=[
            full(counts),
            full(indices),
            full(partial),
            full(lengths),
            pl.BlockSpec((None, bq, None, h), lambda bi, hi, qi: (bi, qi, hi, 0)),
            pl.BlockSpec((None, s, None, h), lambda bi, hi, qi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, s, None, h), lambda bi, hi, qi: (bi, 0, hi // g, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, h), lambda bi, hi, qi: (bi, qi, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, nq, t), jnp.float32)],
        compiler_params=None if interpret else _compat.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="block_sparse_attention",
    )(counts, indices, partial, lengths, q, k, v)
    return out, jnp.swapaxes(lse, 1, 2)


# ----------------------------------------------------------------------------- mosaic tpu


def _tpu_kernel(
    cnt_ref,
    idx_ref,
    flg_ref,
    len_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    m_scr,
    l_scr,
    acc_scr,
    *,
    spec: MaskSpec,
    scale: float,
    bq: int,
    bk: int,
    nqb: int,
    maxk: int,
    hm: int,
    per_head: bool,
    has_lengths: bool,
):
    bi, hi, qi, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    hs = hi if per_head else 0
    row = hs * nqb + qi
    length = len_ref[bi]
    start = idx_ref[row * maxk + j] * bk

    @pl.when(j == 0)
    def _init():
        scratch_init(m_scr, l_scr, acc_scr)

    @pl.when(j < cnt_ref[(bi * hm + hs) * nqb + qi])
    def _block():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        if spec.causal or spec.window is not None or has_lengths:
            qpos = qi * bq + spec.q_offset + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
            kpos = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
            s = jnp.where(_element_visible(qpos, kpos, length, spec, has_lengths), s, -jnp.inf)
        scratch_update(m_scr, l_scr, acc_scr, s, v)

    @pl.when(j == maxk - 1)
    def _finish():
        scratch_finish(m_scr, l_scr, acc_scr, o_ref, lse_ref)


def _tpu_call(q, k, v, meta, lengths, *, spec, scale, bs: BlockSizes, has_lengths, interpret):
    pltpu = _compat.pltpu
    b, t, nq, h = q.shape
    n = k.shape[2]
    g = nq // n
    counts, indices, partial = meta
    per_head = indices.shape[0] > 1
    bq, bk = bs.block_q, bs.block_kv
    nqb, maxk = t // bq, indices.shape[-1]
    qt, kt, vt = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # heads-major tiles for Mosaic TPU
    kernel = functools.partial(
        _tpu_kernel,
        spec=spec,
        scale=scale,
        bq=bq,
        bk=bk,
        nqb=nqb,
        maxk=maxk,
        hm=indices.shape[0],
        per_head=per_head,
        has_lengths=has_lengths,
    )

    def kv_map(bi, hi, qi, j, cnt, idx, flg, lens):
        row = (hi if per_head else 0) * nqb + qi
        return bi, hi // g, idx[row * maxk + j], 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, nq, nqb, maxk),
        in_specs=[
            pl.BlockSpec((None, None, bq, h), lambda bi, hi, qi, j, *_: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, bk, h), kv_map),
            pl.BlockSpec((None, None, bk, h), kv_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, h), lambda bi, hi, qi, j, *_: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, 1, bq), lambda bi, hi, qi, j, *_: (bi, hi, 0, qi)),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, h), jnp.float32),
        ],
    )
    call = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct((b, nq, 1, t), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_compat.tpu_interpret_params() if interpret else False,
        name="block_sparse_attention_tpu",
    )
    out, lse = call(counts.reshape(-1), indices.reshape(-1), partial.reshape(-1), lengths, qt, kt, vt)
    return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse[:, :, 0], 1, 2)


# ----------------------------------------------------------------------------- public entry


@functools.partial(jax.jit, static_argnames=("spec", "scale", "bs", "backend", "has_lengths", "interpret"))
def _block_sparse_jit(q, k, v, meta, lengths, *, spec, scale, bs, backend, has_lengths, interpret):
    counts, indices, partial = meta
    # Per row: listed blocks that start before its length (indices are sorted, so a prefix).
    nvalid = (lengths + bs.block_kv - 1) // bs.block_kv
    listed = jnp.arange(indices.shape[-1]) < counts[..., None]
    counts = jnp.sum(listed[None] & (indices[None] < nvalid[:, None, None, None]), axis=-1, dtype=jnp.int32)
    meta = (counts, indices, partial)  # counts now [B, Hm, nqb]
    return _KERNELS[backend](
        q, k, v, meta, lengths, spec=spec, scale=scale, bs=bs, has_lengths=has_lengths, interpret=interpret
    )


def _mgpu_call(q, k, v, meta, lengths, *, interpret, **kw):
    del interpret  # Mosaic GPU has no interpreter for wgmma: the kernel runs on a Hopper GPU only
    return mgpu_block_sparse_attention(q, k, v, meta, lengths, **kw)


# backend -> Pallas kernel ("reference" is handled before the kernels' metadata is built)
_KERNELS = {"triton": _generic_call, "mosaic_tpu": _tpu_call, "mosaic_gpu": _mgpu_call}


def block_sparse_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: MaskSpec = MaskSpec(),
    block_mask: np.ndarray | None = None,
    kv_lengths: jax.Array | None = None,
    scale: float | None = None,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
    metadata: BlockMetadata | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Block-sparse flash attention (see module docstring).

    q [B, T, Nq, H]; k, v [B, S, N, H]; mask: static `MaskSpec`; block_mask: host bool
    [nqb, nkb] or [Nq, nqb, nkb] at `mask.mask_block` granularity; kv_lengths [B] int (keys
    at or past the length are invisible; key blocks past it are skipped). `metadata` may
    carry a precomputed `build_block_metadata` result (it must match the kernel blocks).
    backend: one of `_compat.KERNEL_BACKENDS` or None (by device). Returns (out [B, T, Nq, H], lse
    [B, T, Nq] float32)."""
    backend = _compat.resolve_backend(backend, interpret)
    if backend == "reference":
        return block_sparse_attention_reference(
            q, k, v, mask=mask, block_mask=block_mask, kv_lengths=kv_lengths, scale=scale
        )
    bs = block_sizes or BlockSizes.get_default(backend)
    _check_inputs(q, k, v, kv_lengths, backend, bs)
    b, t, nq, h = q.shape
    s = k.shape[1]
    mbq = bs.meta_block_q(backend)
    if metadata is None:
        metadata = build_block_metadata(mask, t, s, mbq, bs.block_kv, block_mask)
    if metadata.counts.shape[0] not in (1, nq) or metadata.counts.shape[1] != t // mbq:
        raise ValueError(f"metadata counts shape {metadata.counts.shape} does not match [1 or Nq={nq}, {t // mbq}]")
    meta = tuple(jnp.asarray(a, jnp.int32) for a in metadata[:3])
    has_lengths = kv_lengths is not None
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else jnp.minimum(kv_lengths.astype(jnp.int32), s)
    scale = float(h**-0.5 if scale is None else scale)
    return _block_sparse_jit(
        q,
        k,
        v,
        meta,
        lengths,
        spec=dataclasses.replace(mask, mask_block=None),
        scale=scale,
        bs=bs,
        backend=backend,
        has_lengths=has_lengths,
        interpret=interpret,
    )


def flops(q_len: int, kv_len: int, num_heads: int, head_dim: int, batch: int = 1, density: float = 1.0) -> float:
    """Matmul FLOPs of attention forward (2 matmuls of 2*T*S*H each), scaled by density."""
    return 4.0 * batch * num_heads * q_len * kv_len * head_dim * density


__all__ = [
    "BlockSizes",
    "MaskSpec",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "build_block_metadata",
    "flops",
]
