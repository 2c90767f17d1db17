"""Hopper (Mosaic GPU) KIVI-2/4/8 decode attention (Liu et al. 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750): codes are
unpacked straight into the registers that feed `wgmma`, so the tensor cores do every
multiply-add and the CUDA cores spend about one instruction per code.

Why a layout of its own (`fragments.py`): the Triton kernel (`pallas_kernels.quantized_decode_
attention`) unpacks codes in one layout and pays for a trip through shared memory into the MMA
operand layout; here the codes are stored so that each thread's 16-byte load already holds
exactly its `wgmma` A fragment (keys as A = K [64 tokens, H], values as A = V^T [H, 64 tokens]).
Keys, values and their scales sit side by side (`KiviFragments`), so a pipeline step issues three
TMA copies. `kvjax.quant.kivi` (layout="fragments", the default on Hopper) writes the layout
directly; `to_fragment_layout` converts a standard KIVI cache. The register-level code is in
`registers.py`. 2- and 4-bit codes go through the tensor cores in bf16 (128 + f * code is exact
below 256); 8-bit codes need 10 mantissa bits, so the kernel runs them in f16 (1024 + f * code,
`operand_dtype`; the fragment layout then stores their scales in f16 too: scales and zeros beyond
f16's range, |x| > 65504, cannot be stored).

Per 64-token tile (one CTA = one warpgroup = one (batch, KV head, split)):
  1. keys: each register = `lop3(word >> shift, mask << offset, 0x43004300)` (bf16 128 + f * code,
     exact; 2-bit codes: three shifts serve a word's eight positions, f = 1, 4 or 16 per column
     tile, `code_position`), then code exactly (`sub` 128, or `fma` by 1/f and -128/f), `fma`
     scale and zero: the K tile in bf16, in registers. Where `folds_scales` (H is 128 or 256 and
     a key group spans whole tiles) the scales are folded into the query instead, once per key
     group and pipeline step (B = bf16(q * s) / f in shared memory, zq = q . z - 128 sum(B) in
     float32, `fold_query_fn`): the keys enter the product as 128 + f * code straight from
     `lop3`, and zq is added to the scores;
  2. S^T [64, 8] = K @ Q^T on the tensor cores (the T*Gq query rows, zero-padded to 2, 4 or a
     multiple of 8 and repeated up to wgmma's N = 8); the values unpack meanwhile;
  3. online softmax over the tile's 64 tokens (exp2; the length mask only on tiles that cross it)
     with FlashAttention-4's conditional rescaling: the tile keeps the running max unless one of
     its scores passes it by LAZY_TAU; the vote rides on the tile's commit barrier
     (`bar.red.or.pred`), and only a tile that fails it reduces the max across warps, rescales and
     redoes its probabilities;
  4. values: the probabilities repeated once per value group (NB = (H/Gv) * rows columns, a
     register copy), B = p * v_scale / f (the per-token scale folded in, bf16), A = bf16(128 + f *
     code) straight from `lop3`; O^T [H, NB] += A @ B on the tensor cores; the offset and the zero
     points come back exactly through per-column sums (sum_t p * v_zero - 128 * sum_t B), kept
     per thread and summed per warp after the loop (`warp_sums_fn`).
Every shared-memory load of the loop is free of bank conflicts (the key-channel order of
`key_channel`, the value-scale order of `KiviFragments.v_sz`), and the kernel runs without
Pallas' automatic barriers (each step's own warpgroup barrier orders its shared memory).
The split-K partials are finished, the full-precision residual window attended and all of them
merged through their maxima in one more (Triton-lowered) kernel (`merge.py`; its jnp reference,
and the epilogue where H or the number of splits is not a power of two, is `epilogue.py`). On
CPU the tests check the layout, a numpy model of the kernel's arithmetic, the merge in interpret
mode and the lowering for a CUDA target (Mosaic GPU has no interpreter for wgmma); the kernel
itself is checked against the jnp reference on a Hopper GPU
(`tests/kernels/test_kernel_quantized_decode_mgpu.py`, `tests/quant/test_quant_kivi_fragments.py`,
`benchmarks/kernels_bench.py`, `benchmarks/kivi_mgpu_ab.py`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from .._compat import pl, plgpu
from .._decode_common import checked_lengths, per_head
from .epilogue import assemble, residual_partial
from .fold import add_columns_fn, fold_query_fn, folds_scales
from .fragments import TILE, KiviFragments, operand_dtype
from .merge import merge_partials
from .registers import code_base, commit_any_fn, expand_fn, tile_fn, unpack_fn, warp_sums_fn
from .shapes import KiviMgpuBlockSizes, check_shapes, query_columns, score_columns, value_columns

LAZY_TAU = 8.0  # log2 units: probabilities of a tile that keeps the running max stay <= 2^8


def _swizzle(row_bytes: int) -> int:
    for s in (128, 64, 32):
        if row_bytes % s == 0:
            return s
    raise ValueError(f"rows of {row_bytes} bytes cannot be swizzled")


def kernel_partials(qb, fr: KiviFragments, lengths, *, bits, gk, gv, rows_q, scale, block_sizes: KiviMgpuBlockSizes):
    """The Pallas kernel: qb [B, N, NS, H] in `operand_dtype(bits)` (`query_columns`), block_sizes
    resolved (`KiviMgpuBlockSizes.resolved`).
    Returns per split: acc [B,N,P,H,NB], corr [B,N,P,64,NC], lsum and m [B,N,P,64,NS] float32
    (see `epilogue.finish_splits`); the column sums corr and lsum summed per warp (`warp_sums_fn`:
    rows 16w ... 16w + 15 all hold warp w's sums)."""
    b, n, nsk, h = qb.shape
    ns = score_columns(rows_q)
    if nsk != ns:
        raise ValueError(f"qb has {nsk} query columns; expected {ns}")
    fold = folds_scales(gk, h, bits)
    splits, stages, tps = block_sizes.num_splits, block_sizes.stages, block_sizes.tiles_per_step
    nb = value_columns(h // gv, rows_q)
    nc = math.lcm(ns, (h // gv) * rows_q)  # distinct columns of B (NB repeats them up to wgmma's minimum)
    tiles = fr.words.shape[2]
    steps = tiles // (splits * tps)
    w = fr.words.shape[4]
    n_gc = h // gv
    k_rows = max(1, tps * TILE // gk)  # key scale rows a step
    log2e_scale = scale * math.log2(math.e)
    wgmma_layout = plgpu.Layout.WGMMA
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    odt = operand_dtype(bits)  # the wgmma operands: bf16, f16 for 8-bit codes
    ref = plgpu.RefType()
    unpack_k = [
        plgpu.inline_mgpu(
            arg_types=(ref,) if fold else (ref, ref),
            return_type=plgpu.ShapeDtypeStruct((TILE, h), odt, layout=wgmma_layout),
        )(unpack_fn(TILE, h, bits, gk, h, t, 0, k_rows))
        for t in range(tps)
    ]
    unpack_v = [
        plgpu.inline_mgpu(arg_types=(ref,), return_type=plgpu.ShapeDtypeStruct((h, TILE), odt, layout=wgmma_layout))(
            unpack_fn(h, TILE, bits, gk, h, t, 1, k_rows)
        )
        for t in range(tps)
    ]
    expand = [
        [
            plgpu.inline_mgpu(
                arg_types=(ref,), return_type=plgpu.ShapeDtypeStruct((TILE, nc), jnp.float32, layout=wgmma_layout)
            )(expand_fn(nc, rows_q, n_gc, t, which, bits))
            for which in (0, 1)
        ]
        for t in range(tps)
    ]

    def widen(x, cols):  # columns repeated up to `cols` (a register copy: no instructions)
        if x.shape[-1] == cols:
            return x
        layout = wgmma_layout if x.ndim == 2 else col_layout
        return plgpu.inline_mgpu(
            arg_types=(layout,), return_type=plgpu.ShapeDtypeStruct((*x.shape[:-1], cols), x.dtype, layout=layout)
        )(tile_fn(cols // x.shape[-1]))(x)

    per_warp = {
        c: plgpu.inline_mgpu(
            arg_types=(wgmma_layout,), return_type=plgpu.ShapeDtypeStruct((TILE, c), jnp.float32, layout=wgmma_layout)
        )(warp_sums_fn())
        for c in {nc, ns}
    }
    commit_any = plgpu.inline_mgpu(arg_types=(wgmma_layout, wgmma_layout, ref))(commit_any_fn(LAZY_TAU))
    q_swz = _swizzle(h * 2)
    q_transforms = (plgpu.TilingTransform((8, q_swz // 2)), plgpu.SwizzleTransform(q_swz))
    # folding: the key scales go into the query once per key group (`fold_query_fn`): the first
    # tile's at the start of a step (then a barrier), a later tile's during the tile before it
    # (committed by that tile's barrier); tile t reads buffer buf[t]
    builds = [t for t in range(tps) if t == 0 or (t * TILE) % gk == 0] if fold else []
    buf = [sum(1 for u in builds if u <= t) - 1 for t in range(tps)]
    if fold:
        qref = plgpu.RefType(transforms=q_transforms)
        fold_q = {
            t: plgpu.inline_mgpu(arg_types=(qref, ref, qref, ref))(fold_query_fn(nsk, h, t, gk, k_rows, bits))
            for t in builds
        }
        add_zq = plgpu.inline_mgpu(
            arg_types=(wgmma_layout, ref),
            return_type=plgpu.ShapeDtypeStruct((TILE, nsk), jnp.float32, layout=wgmma_layout),
        )(add_columns_fn(nsk))
    b_swz = _swizzle(nb * 2)

    def body(
        qb_ref,
        words_ref,
        ksz_ref,
        vsz_ref,
        len_ref,
        acc_out,
        corr_out,
        l_out,
        m_out,
        b_smem,
        flag_smem,
        bar,
        q_smem,
        *fold_smem,
    ):
        bk_smem, zq_smem = fold_smem[: len(builds)], fold_smem[len(builds) :]
        si, ni, bi = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
        plgpu.copy_gmem_to_smem(qb_ref.at[bi, ni], q_smem, bar)
        plgpu.barrier_wait(bar)
        length = len_ref[bi, ni] if lengths.ndim == 2 else len_ref[bi]  # (past S: no tile crosses it)
        first = si * steps * tps  # first tile of this split

        def tile_step(tile, t, words, ksz, vsz, carry):
            acc, m, corr, lsum = carry
            a_k = unpack_k[t](words) if fold else unpack_k[t](words, ksz)

            def qk(acc_ref):  # the values unpack while the tensor cores work on the keys
                plgpu.wgmma(acc_ref, a_k, plgpu.transpose_ref(bk_smem[buf[t]] if fold else q_smem, (1, 0)))
                a_v = unpack_v[t](words)
                return acc_ref[...], a_v

            s, a_v = pl.run_scoped(qk, plgpu.ACC((TILE, nsk), jnp.float32))
            if t + 1 in builds[1:]:  # the next tile's key groups: committed by this tile's barrier
                fold_q[t + 1](q_smem, ksz, bk_smem[buf[t + 1]], zq_smem[buf[t + 1]])
            if fold:
                s = add_zq(s, zq_smem[buf[t]])
            s = s * log2e_scale
            start = tile * TILE

            def mask(x):
                tok = start + plgpu.broadcasted_iota(jnp.int32, (TILE, ns), 0, layout=wgmma_layout)
                return jnp.where(tok < length, x, -jnp.inf)

            s = lax.cond(start + TILE > length, mask, lambda x: x, s)  # only tiles that cross the length

            def probabilities(m_used, corr, lsum):  # -> B = p * v_scale in SMEM (uncommitted), corr, lsum
                p = jnp.exp2(s - lax.broadcast_in_dim(m_used, s.shape, [1]))
                lsum = lsum + p
                p = widen(p, nc)  # one copy of the probabilities per value group
                bv = (p * expand[t][0](vsz)).astype(odt)
                corr = corr + p * expand[t][1](vsz)  # two fused multiply-adds an element
                corr = corr + bv.astype(jnp.float32) * -code_base(bits)
                b_smem[...] = widen(bv, nb)
                return corr, lsum

            def rescaled(acc, m, corr, lsum):  # the running max moves to include this tile
                m_new = jnp.maximum(m, s.max(axis=0))
                alpha = jnp.exp2(m - m_new)
                lsum = lsum * lax.broadcast_in_dim(alpha, s.shape, [1])
                corr = corr * lax.broadcast_in_dim(widen(alpha, nc), corr.shape, [1])
                corr, lsum = probabilities(m_new, corr, lsum)
                plgpu.commit_smem()
                return acc * lax.broadcast_in_dim(widen(alpha, nb), acc.shape, [1]), m_new, corr, lsum

            # FlashAttention-4's conditional rescaling: keep the max unless a score passes it by LAZY_TAU
            corr_kept, lsum_kept = probabilities(m, corr, lsum)
            commit_any(s, lax.broadcast_in_dim(m, s.shape, [1]), flag_smem)
            acc, m, corr, lsum = lax.cond(
                flag_smem[0] != 0, lambda: rescaled(acc, m, corr, lsum), lambda: (acc, m, corr_kept, lsum_kept)
            )

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, a_v, b_smem)

            return pl.run_state(pv)(plgpu.ACC.init(acc)), m, corr, lsum

        def step(idx, words, ksz, vsz, carry):
            (i,) = idx
            if builds:  # B = q * s / f and zq = q . z - 128 sum(B) for the first tile's key groups
                fold_q[0](q_smem, ksz, bk_smem[0], zq_smem[0])
                plgpu.commit_smem()
            for t in range(tps):
                carry = tile_step(first + i * tps + t, t, words, ksz, vsz, carry)
            return carry

        rows_w = 2 * w // 128  # rows of 128 words a tile (keys, then values)
        if gk > tps * TILE:  # one key group spans several steps: blocks of one row
            k_map = lambda i: (i * tps * TILE // gk, 0, 0)
            k_first, k_total = first * TILE // gk, max(1, steps * tps * TILE // gk)
        else:
            k_map = lambda i: (i, 0, 0)
            k_first, k_total = first * TILE // gk, steps * k_rows
        in_specs = [
            plgpu.BlockSpec((tps * rows_w, 128), lambda i: (i, 0)),
            plgpu.BlockSpec((k_rows, 2, h), k_map),
            plgpu.BlockSpec((tps * n_gc, 128), lambda i: (i, 0)),
        ]
        gmem = (
            words_ref.at[bi, ni, pl.ds(first * rows_w, steps * tps * rows_w)],
            ksz_ref.at[bi, ni, pl.ds(k_first, k_total)],
            vsz_ref.at[bi, ni, pl.ds(first * n_gc, steps * tps * n_gc)],
        )
        zeros_t = plgpu.layout_cast(jnp.zeros((TILE, nc), jnp.float32), wgmma_layout)
        zeros_s = plgpu.layout_cast(jnp.zeros((TILE, ns), jnp.float32), wgmma_layout)
        m0 = plgpu.layout_cast(jnp.full((ns,), -1e30, jnp.float32), col_layout)
        acc0 = plgpu.layout_cast(jnp.zeros((h, nb), jnp.float32), wgmma_layout)
        acc, m, corr, lsum = plgpu.emit_pipeline(
            step, grid=(steps,), in_specs=in_specs, max_concurrent_steps=stages, init_carry=(acc0, m0, zeros_t, zeros_s)
        )(*gmem)
        corr, lsum = per_warp[nc](corr), per_warp[ns](lsum)  # the merge then reads one row in 16
        acc_out.at[bi, ni, si][...] = acc
        corr_out.at[bi, ni, si][...] = corr
        l_out.at[bi, ni, si][...] = lsum
        m_out.at[bi, ni, si][...] = lax.broadcast_in_dim(m, (TILE, ns), [1])

    def entry(*refs):
        b_scr = plgpu.SMEM(
            (TILE, nb), odt, transforms=(plgpu.TilingTransform((8, b_swz // 2)), plgpu.SwizzleTransform(b_swz))
        )
        # the query; when folding also the scaled query and its zero-point sums, a buffer per key group
        # of a step (only then: shared memory is, with the registers, what holds the kernel at 4 CTAs
        # per SM)
        q_scr = [plgpu.SMEM((nsk, h), odt, transforms=q_transforms)]
        q_scr += [plgpu.SMEM((nsk, h), odt, transforms=q_transforms) for _ in builds]
        q_scr += [plgpu.SMEM((nsk,), jnp.float32) for _ in builds]
        pl.run_scoped(
            lambda *s: body(*refs, *s), b_scr, plgpu.SMEM((1,), jnp.int32), plgpu.Barrier(num_barriers=1), *q_scr
        )

    f32 = jnp.float32
    out_type = (
        jax.ShapeDtypeStruct((b, n, splits, h, nb), f32),
        jax.ShapeDtypeStruct((b, n, splits, TILE, nc), f32),
        jax.ShapeDtypeStruct((b, n, splits, TILE, ns), f32),
        jax.ShapeDtypeStruct((b, n, splits, TILE, ns), f32),
    )
    words = lax.bitcast_convert_type(fr.words, jnp.int32)
    words = words.reshape(b, n, tiles * 2 * w // 128, 128)  # TMA boxes hold <= 256 elements a side
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(splits, n, b),
        grid_names=("split", "head", "batch"),
        # No automatic barriers around every SMEM store and copy: each step's reads of its pipeline
        # slot end before the step's own warpgroup barrier (commit_smem), so the slot is free by the
        # time any thread issues the copy that refills it, and B is rewritten only after the
        # wgmma that read it has been waited for.
        compiler_params=plgpu.CompilerParams(approx_math=True, unsafe_no_auto_barriers=True),
    )(qb, words, fr.k_sz, fr.v_sz.reshape(b, n, tiles * n_gc, 128), lengths)  # a tile's v_sz: H/Gv rows of 128


_MOVED = ("num_splits", "stages", "tiles_per_step")  # keyword arguments now in KiviMgpuBlockSizes
_REMOVED = {  # keyword arguments of removed variants, each measured slower than the way the kernel runs
    "overlap_v": "the values always unpack during the key product",
    "mask_cond": "only tiles that cross a row's length are masked",
    "auto_barriers": "the kernel runs without Pallas' automatic barriers",
    "lazy_rescale": "the running max is always rescaled lazily (LAZY_TAU)",
    "fold_scales": "the key scales are folded into the query exactly where `folds_scales` says",
    "merge": "the Triton merge runs where H and the splits are powers of two, the XLA epilogue elsewhere",
    "warp_sums": "the column sums are always summed per warp",
}


def _refuse(kwargs: dict) -> None:
    for name in kwargs:
        if name in _MOVED:
            raise TypeError(
                f"{name}= moved into block_sizes: pass block_sizes=KiviMgpuBlockSizes({name}={kwargs[name]!r})"
            )
        if name in _REMOVED:
            raise TypeError(f"{name}= was removed: {_REMOVED[name]}")
        raise TypeError(f"quantized_decode_attention_mgpu() got an unexpected keyword argument {name!r}")


def quantized_decode_attention_mgpu(
    q,
    fr: KiviFragments,
    lengths,
    *,
    bits: int,
    k_res=None,
    v_res=None,
    res_lengths=None,
    scale: float | None = None,
    block_sizes: KiviMgpuBlockSizes | None = None,
    **removed,
):
    """KIVI decode attention on Hopper (module doc). q [B, T, Nq, H] bf16; fr: the cache in the
    fragment layout (`to_fragment_layout`); lengths [B] or [B, N] valid quantized tokens; the
    residual window k_res/v_res [B, N, R, H] with res_lengths as in `quantized_decode_attention`;
    block_sizes: the tuning knobs (`KiviMgpuBlockSizes`; None: the defaults for the shape).
    Returns (out [B, T, Nq, H] bf16, lse [B, T, Nq] float32)."""
    _refuse(removed)
    b, _t, _nq, h, n, s, gk, gv = check_shapes(q, fr, bits)
    if (k_res is None) != (v_res is None) or (k_res is not None and res_lengths is None):
        raise ValueError("pass k_res, v_res and res_lengths together, or none of them")
    scale = float(h**-0.5 if scale is None else scale)
    block_sizes = (block_sizes or KiviMgpuBlockSizes.get_default()).resolved(
        b=b, n=n, s=s, h=h, gk=gk, bits=bits, fold=folds_scales(gk, h, bits)
    )
    lengths = checked_lengths(lengths, b, n, "lengths")
    res_lengths = None if res_lengths is None else checked_lengths(res_lengths, b, n, "res_lengths")
    return _mgpu_jit(
        q, fr, lengths, k_res, v_res, res_lengths, bits=bits, gk=gk, gv=gv, scale=scale, block_sizes=block_sizes
    )


@functools.partial(jax.jit, static_argnames=("bits", "gk", "gv", "scale", "block_sizes"))
def _mgpu_jit(q, fr, lengths, k_res, v_res, res_lengths, *, bits, gk, gv, scale, block_sizes):
    t, h = q.shape[1], q.shape[3]
    qb, qr, rows_q, rows_p = query_columns(q, fr.words.shape[1])
    qb = qb.astype(operand_dtype(bits))  # f16 for 8-bit codes
    acc, corr, lsum, m = kernel_partials(
        qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, scale=scale, block_sizes=block_sizes
    )
    splits = block_sizes.num_splits
    if h & (h - 1) == 0 and splits & (splits - 1) == 0:  # Triton blocks: powers of two
        return merge_partials(
            (acc, corr, lsum, m),
            qr,
            k_res,
            v_res,
            res_lengths,
            rows_q=rows_q,
            rows_p=rows_p,
            gv=gv,
            t=t,
            scale=scale,
            row_stride=16,
            out_dtype=q.dtype,
        )
    residual = None
    if k_res is not None:
        res_lengths = jnp.minimum(per_head(res_lengths, *k_res.shape[:2], "res_lengths"), k_res.shape[2])
        residual = residual_partial(qr, k_res, v_res, res_lengths, t=t, scale=scale)
    out, lse = assemble(
        (acc, corr, lsum, m), rows_q=rows_q, rows_p=rows_p, gv=gv, t=t, residual=residual, row_stride=16
    )
    return out.astype(q.dtype), lse
