"""Hopper (Mosaic GPU) KIVI-2/4 decode attention (Liu et al. 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750): codes are
unpacked straight into the registers that feed `wgmma`, so the tensor cores do every
multiply-add and the CUDA cores spend about one instruction per code.

Why a layout of its own. `wgmma` reads its A operand from registers in a fixed fragment
layout (thread `l` of warp `w` holds rows 16w + l/4 (+8) and column pairs 8j + 2(l%4)). The
Triton kernel (`quantized_decode_attention.py`) unpacks codes in one layout and pays for a trip
through shared memory into the MMA layout; here the codes are stored so that each thread's
16-byte load already holds exactly its fragment (Marlin-style, Frantar et al. 2024):

* keys: for every 64-token tile, A = K [64 tokens, H] with the channels permuted so that a
  thread's H/4 channels are contiguous (its scales and zeros are then two vector loads); word
  m of thread t holds, at bits (b*i, 16 + b*i), the two codes of register m*R + i (R = 16/b);
* values: A = V^T [H, 64 tokens] (rows = channels), packed the same way.

`to_fragment_layout` converts the standard KIVI layout (the one `quantized_decode_attention`
reads) into this one; a cache that is written in it directly skips the conversion.

Per tile (one CTA = one warpgroup = one (batch, KV head, split)):
  1. keys: each register = `lop3(word >> b*i, mask, 0x43004300)` (bf16 128 + code, exact),
     `sub` 128, `fma` scale and zero: K tile in bf16, in registers;
  2. S^T [64, NB] = K @ Q^T on the tensor cores (Q's T*Gq rows repeated once per value group,
     NB = (H/Gv) * rows columns, so every later step stays elementwise);
  3. online softmax over the tile's 64 tokens (max over rows, exp2);
  4. values: B = p * v_scale (the per-token scale folded into the probabilities, bf16),
     A = bf16(128 + code) straight from `lop3`; O^T [H, NB] += A @ B on the tensor cores;
     the offset and the zero points are added back exactly through per-column sums
     (sum_t p * v_zero - 128 * sum_t B), kept per thread and reduced after the loop.
The split-K partials (and the full-precision residual window, done in XLA) are merged through
their LSEs. Lowered for a CUDA target in the CPU tests; checked against the jnp reference on
the GPU by `benchmarks/kernels_bench.py` (Mosaic GPU has no interpreter for wgmma).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import packing
from ._compat import pl, plgpu
from ._decode_common import merge_splits, per_head

TILE = 64  # tokens per pipeline step (the wgmma M of the key product)
MGPU_BITS = (2, 4)
_MAGIC = 0x43004300  # two bf16 128.0: OR-ing a code < 128 into the mantissa gives 128 + code


class KiviFragments(NamedTuple):
    """A KIVI cache in the fragment layout of this kernel (see module doc).

    k_words [B, N, S/64, 64*H*b/32] uint32; k_scale, k_zero [B, N, S/Gk, H] (unchanged);
    v_words [B, N, S/64, 64*H*b/32] uint32; v_scale_t, v_zero_t [B, N, H/Gv, S] (transposed)."""

    k_words: jax.Array
    k_scale: jax.Array
    k_zero: jax.Array
    v_words: jax.Array
    v_scale_t: jax.Array
    v_zero_t: jax.Array


# ----------------------------------------------------------------------------- layout


@functools.lru_cache(maxsize=None)
def fragment_slots(m_rows: int, k_cols: int, bits: int):
    """Where each code of an A tile [m_rows, k_cols] sits: int arrays row, col of shape
    [128 threads, W words, R regs a word, 2 halves] (the wgmma fragment row and column of the
    code stored at bits (bits*i + 16*half) of word w of thread t)."""
    if bits not in MGPU_BITS:
        raise ValueError(f"bits={bits} is not supported by the Mosaic GPU KIVI kernel; expected {MGPU_BITS}")
    r = 16 // bits
    col_tiles = k_cols // 8
    nregs = (m_rows // 64) * col_tiles * 2
    words = nregs // r
    t = np.arange(128)[:, None, None, None]
    m = np.arange(words)[None, :, None, None]
    i = np.arange(r)[None, None, :, None]
    e = np.arange(2)[None, None, None, :]
    warp, lane = t // 32, t % 32
    flat = m * r + i  # index into the (row tile, column tile, row half) register array
    rt, j, half = flat // (2 * col_tiles), (flat // 2) % col_tiles, flat % 2
    row = 64 * rt + 16 * warp + 8 * half + lane // 4
    col = 8 * j + 2 * (lane % 4) + e
    shape = (128, words, r, 2)
    return np.broadcast_to(row, shape).copy(), np.broadcast_to(col, shape).copy()


def key_channel(col, h: int):
    """Channel that wgmma column `col` of the key tile holds: thread l%4 = q owns the
    contiguous channels q*H/4 ... (q+1)*H/4 - 1 (col 8j + 2q + e -> q*H/4 + 2j + e)."""
    j, q, e = col // 8, (col % 8) // 2, col % 2
    return q * (h // 4) + 2 * j + e


def _pack_tiles(codes, rows, cols, bits):
    """codes [..., 64-token tiles, A rows, A cols] ints -> words [..., tiles, 128 * W] uint32."""
    c = codes[..., rows, cols].astype(jnp.uint32)  # [..., 128, W, R, 2]
    r = 16 // bits
    shifts = (bits * np.arange(r)[:, None] + 16 * np.arange(2)[None, :]).astype(np.uint32)
    w = jnp.sum(c << shifts, axis=(-2, -1), dtype=jnp.uint32)  # disjoint bits: sum == or
    return w.reshape(*w.shape[:-2], -1)


def to_fragment_layout(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, *, bits: int) -> KiviFragments:
    """Standard KIVI layout (k_codes [B,N,S/pw,H], v_codes [B,N,S,H/pw] uint32; scales as in
    `quantized_decode_attention`) -> `KiviFragments`. S must be a multiple of 64, H of 64."""
    b, n, _, h = k_codes.shape
    kc = packing.unpack(k_codes, bits, axis=2)  # [B,N,S,H]
    s = kc.shape[2]
    if s % TILE or h % 64:
        raise ValueError(f"the Mosaic GPU KIVI kernel needs S % 64 == 0 and H % 64 == 0; got S={s}, H={h}")
    vc = packing.unpack(v_codes, bits, axis=3)  # [B,N,S,H]
    rows, cols = fragment_slots(TILE, h, bits)
    kt = kc.reshape(b, n, s // TILE, TILE, h)
    k_words = _pack_tiles(kt, rows, key_channel(cols, h), bits)
    vrows, vcols = fragment_slots(h, TILE, bits)
    vt = jnp.swapaxes(vc.reshape(b, n, s // TILE, TILE, h), -1, -2)  # [..., H, 64]
    v_words = _pack_tiles(vt, vrows, vcols, bits)
    return KiviFragments(k_words, k_scale, k_zero, v_words, jnp.swapaxes(v_scale, 2, 3), jnp.swapaxes(v_zero, 2, 3))


# ----------------------------------------------------------------------------- register code


def _mgpu():
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, vector
    from jax.experimental import mosaic as _m  # noqa: F401
    import jax.experimental.mosaic.gpu as mgpu
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils

    return ir, arith, gpu, llvm, vector, mgpu, fa, utils


def _thread_coords():
    ir, arith, gpu, _, _, _, _, utils = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    tid = arith.remui(tid, utils.c(128, i32))
    return tid, arith.divui(tid, utils.c(32, i32)), arith.remui(tid, utils.c(32, i32))


def _idx(x):
    ir, arith, *_ = _mgpu()
    return arith.index_cast(ir.IndexType.get(), x)


def _load_words(ref, lead, tid, words):
    """This thread's `words` consecutive int32 words of a tile stored as [W*128/128, 128]
    (16-byte loads; 8-byte ones when a thread has only 2 words)."""
    ir, arith, _, _, vector, _, _, utils = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    out = []
    width = min(words, 4)
    for v in range(words // width):
        off = arith.addi(arith.muli(tid, utils.c(words, i32)), utils.c(width * v, i32))
        row, col = arith.divui(off, utils.c(128, i32)), arith.remui(off, utils.c(128, i32))
        vec = vector.load(ir.VectorType.get((width,), i32), ref, [*lead, _idx(row), _idx(col)])
        out += [vector.extract(vec, [], [k]) for k in range(width)]
    return out


def _asm(ret_ty, args, body, constraints):
    _, _, _, llvm, *_ = _mgpu()
    return llvm.inline_asm(ret_ty, args, body, constraints)


def _code_pair(word, shift, bits):
    """bf16x2 (as i32) 128 + code for the codes at bits `shift` and 16 + `shift` of `word`."""
    ir, *_ = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    mask = ((1 << bits) - 1) * 0x00010001
    sh = f"shr.b32 t, $1, {shift};" if shift else "mov.b32 t, $1;"
    return _asm(i32, [word], f"{{ .reg .b32 t; {sh} lop3.b32 $0, t, {mask:#x}, {_MAGIC:#x}, 0xEA; }}", "=r,r")


def _dequant_pair(word, shift, bits, s2, z2):
    """bf16x2 (as i32) code * s + z (one rounding) for the codes at `shift` / 16 + `shift`."""
    ir, *_ = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    mask = ((1 << bits) - 1) * 0x00010001
    sh = f"shr.b32 t, $1, {shift};" if shift else "mov.b32 t, $1;"
    body = (f"{{ .reg .b32 t, m; {sh} lop3.b32 t, t, {mask:#x}, {_MAGIC:#x}, 0xEA; mov.b32 m, {_MAGIC:#x}; "
            f"sub.rn.bf16x2 t, t, m; fma.rn.bf16x2 $0, t, $2, $3; }}")
    return _asm(i32, [word, s2, z2], body, "=r,r,r,r")


def _unpack_fn(m_rows, k_cols, bits, gk, h):
    """inline_mgpu body: (words ref[, scale ref, zero ref]) -> bf16 [m_rows, k_cols] in the
    WGMMA layout. With scales (keys): code * s + z; without (values): 128 + code."""
    r = 16 // bits
    col_tiles = k_cols // 8
    words = (m_rows // 64) * col_tiles * 2 // r

    def fn(ctx, words_ref, *scale_refs):
        ir, arith, _, _, vector, mgpu, fa, utils = _mgpu()
        i32 = ir.IntegerType.get_signless(32)
        bf16 = ir.BF16Type.get()
        tid, warp, lane = _thread_coords()
        ws = _load_words(words_ref, [], tid, words)
        pairs = None
        if scale_refs:
            s_ref, z_ref = scale_refs
            q = arith.remui(lane, utils.c(4, i32))
            g = utils.c(0, i32) if gk >= TILE else arith.divui(arith.muli(warp, utils.c(16, i32)), utils.c(gk, i32))
            base = arith.muli(q, utils.c(h // 4, i32))
            pairs = []
            for ref in (s_ref, z_ref):
                vals = []
                for v in range(h // 32):  # H/4 channels = H/32 vectors of 8
                    off = arith.addi(base, utils.c(8 * v, i32))
                    vec = vector.load(ir.VectorType.get((8,), bf16), ref, [_idx(g), _idx(off)])
                    for p in range(4):
                        two = vector.extract_strided_slice(ir.VectorType.get((2,), bf16), vec, [2 * p], [2], [1])
                        vals.append(utils.bitcast(two, i32))
                pairs.append(vals)
        shape = fa.WGMMA_LAYOUT.registers_shape((m_rows, k_cols))
        regs = np.empty(shape, dtype=object)
        for m in range(words):
            for i in range(r):
                flat = m * r + i
                rt, j, half = flat // (2 * col_tiles), (flat // 2) % col_tiles, flat % 2
                if pairs is None:
                    x = _code_pair(ws[m], bits * i, bits)
                else:
                    x = _dequant_pair(ws[m], bits * i, bits, pairs[0][j], pairs[1][j])
                idx = [0] * len(shape)
                idx[0], idx[1], idx[4] = rt, j, half
                regs[tuple(idx)] = utils.bitcast(x, ir.VectorType.get((2,), bf16))
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return fn


def _expand_fn(nb, rows_q, n_gc):
    """inline_mgpu body: ref [H/Gv, 64] bf16 -> f32 [64, NB] in the WGMMA layout with element
    (t, j) = ref[j // rows_q, t] (a per-token value group's scale for every column of it)."""

    def fn(ctx, ref):
        ir, arith, _, _, vector, mgpu, fa, utils = _mgpu()
        from jax._src.lib.mlir.dialects import memref

        i32 = ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        _, warp, lane = _thread_coords()
        q = arith.remui(lane, utils.c(4, i32))
        row0 = arith.addi(arith.muli(warp, utils.c(16, i32)), arith.divui(lane, utils.c(4, i32)))
        shape = fa.WGMMA_LAYOUT.registers_shape((64, nb))
        regs = np.empty(shape, dtype=object)
        for jt in range(nb // 8):
            col = arith.addi(utils.c(8 * jt, i32), arith.muli(q, utils.c(2, i32)))
            grp = arith.remui(arith.divui(col, utils.c(rows_q, i32)), utils.c(n_gc, i32))
            for half in range(2):
                row = arith.addi(row0, utils.c(8 * half, i32))
                x = arith.extf(f32, memref.load(ref, [_idx(grp), _idx(row)]))
                idx = [0] * len(shape)
                idx[1], idx[4] = jt, half
                regs[tuple(idx)] = vector.broadcast(ir.VectorType.get((2,), f32), x)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return fn


# ----------------------------------------------------------------------------- kernel


def _swizzle(row_bytes: int) -> int:
    for s in (128, 64, 32):
        if row_bytes % s == 0:
            return s
    raise ValueError(f"rows of {row_bytes} bytes cannot be swizzled")


def _kernel_partials(qb, fr: KiviFragments, lengths, *, bits, gk, gv, rows_q, splits, scale, stages):
    """qb [B, N, NB, H] bf16 (query rows, repeated per value group, key channels permuted).
    Returns per split: acc [B,N,P,H,NB], corr/l/m [B,N,P,64,NB] f32 (see `_finish`)."""
    b, n, nb, h = qb.shape
    tiles = fr.k_words.shape[2]
    steps = tiles // splits
    wk, wv = fr.k_words.shape[3], fr.v_words.shape[3]
    n_gc = h // gv
    gk_rows = max(1, TILE // gk)
    log2e_scale = scale * math.log2(math.e)
    wgmma_layout = plgpu.Layout.WGMMA
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    bf16 = jnp.bfloat16
    unpack_k = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType()),
        return_type=plgpu.ShapeDtypeStruct((TILE, h), bf16, layout=wgmma_layout),
    )(_unpack_fn(TILE, h, bits, gk, h))
    unpack_v = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(),),
        return_type=plgpu.ShapeDtypeStruct((h, TILE), bf16, layout=wgmma_layout),
    )(_unpack_fn(h, TILE, bits, gk, h))
    expand = plgpu.inline_mgpu(
        arg_types=(plgpu.RefType(),),
        return_type=plgpu.ShapeDtypeStruct((TILE, nb), jnp.float32, layout=wgmma_layout),
    )(_expand_fn(nb, rows_q, n_gc))
    q_swz = _swizzle(h * 2)
    b_swz = _swizzle(nb * 2)

    def body(qb_ref, kw_ref, ks_ref, kz_ref, vw_ref, vs_ref, vz_ref, len_ref,
             acc_out, corr_out, l_out, m_out, q_smem, b_smem, bar):
        si, ni, bi = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("batch")
        plgpu.copy_gmem_to_smem(qb_ref.at[bi, ni], q_smem, bar)
        plgpu.barrier_wait(bar)
        length = len_ref[bi, ni]
        first = si * steps

        def step(idx, kw, ks, kz, vw, vs, vz, carry):
            acc, m, corr, lsum = carry
            (ti,) = idx
            a_k = unpack_k(kw, ks, kz)

            def qk(acc_ref):  # the values unpack while the tensor cores work on the keys
                plgpu.wgmma(acc_ref, a_k, plgpu.transpose_ref(q_smem, (1, 0)))
                a_v = unpack_v(vw)
                return acc_ref[...], a_v

            s, a_v = pl.run_scoped(qk, plgpu.ACC((TILE, nb), jnp.float32))
            s = s * log2e_scale
            tok = (first + ti) * TILE + plgpu.broadcasted_iota(jnp.int32, (TILE, nb), 0, layout=wgmma_layout)
            s = jnp.where(tok < length, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=0))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [1]))
            bv = (p * expand(vs)).astype(bf16)
            alpha_r = lax.broadcast_in_dim(alpha, s.shape, [1])
            corr = corr * alpha_r + (p * expand(vz) - 128.0 * bv.astype(jnp.float32))
            lsum = lsum * alpha_r + p
            b_smem[...] = bv
            plgpu.commit_smem()
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [1])

            def pv(acc_ref):
                plgpu.wgmma(acc_ref, a_v, b_smem)

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            return acc, m_new, corr, lsum

        zeros_t = plgpu.layout_cast(jnp.zeros((TILE, nb), jnp.float32), wgmma_layout)
        carry = (plgpu.layout_cast(jnp.zeros((h, nb), jnp.float32), wgmma_layout),
                 plgpu.layout_cast(jnp.full((nb,), -1e30, jnp.float32), col_layout), zeros_t, zeros_t)
        tile_blk = lambda shape, f: plgpu.BlockSpec(shape, f)  # noqa: E731
        if gk >= TILE:
            k_map = lambda i: (i // (gk // TILE), 0)  # noqa: E731
        else:
            k_map = lambda i: (i, 0)  # noqa: E731
        pipe = plgpu.emit_pipeline(
            step,
            grid=(steps,),
            in_specs=[
                tile_blk((None, wk // 128, 128), lambda i: (i, 0, 0)),
                tile_blk((gk_rows, h), k_map), tile_blk((gk_rows, h), k_map),
                tile_blk((None, wv // 128, 128), lambda i: (i, 0, 0)),
                tile_blk((n_gc, TILE), lambda i: (0, i)), tile_blk((n_gc, TILE), lambda i: (0, i)),
            ],
            max_concurrent_steps=stages,
            init_carry=carry,
        )
        k_first = first * TILE // gk if gk >= TILE else first * (TILE // gk)
        k_rows = steps * TILE // gk if gk >= TILE else steps * gk_rows
        acc, m, corr, lsum = pipe(
            kw_ref.at[bi, ni, pl.ds(first, steps)],
            ks_ref.at[bi, ni, pl.ds(k_first, k_rows)], kz_ref.at[bi, ni, pl.ds(k_first, k_rows)],
            vw_ref.at[bi, ni, pl.ds(first, steps)],
            vs_ref.at[bi, ni, :, pl.ds(first * TILE, steps * TILE)],
            vz_ref.at[bi, ni, :, pl.ds(first * TILE, steps * TILE)],
        )
        acc_out.at[bi, ni, si][...] = acc
        corr_out.at[bi, ni, si][...] = corr
        l_out.at[bi, ni, si][...] = lsum
        m_out.at[bi, ni, si][...] = lax.broadcast_in_dim(m, (TILE, nb), [1])

    def entry(*refs):
        q_scr = plgpu.SMEM((nb, h), bf16, transforms=(plgpu.TilingTransform((8, q_swz // 2)),
                                                       plgpu.SwizzleTransform(q_swz)))
        b_scr = plgpu.SMEM((TILE, nb), bf16, transforms=(plgpu.TilingTransform((8, b_swz // 2)),
                                                          plgpu.SwizzleTransform(b_swz)))
        pl.run_scoped(lambda *s: body(*refs, *s), q_scr, b_scr, plgpu.Barrier(num_barriers=1))

    f32 = jnp.float32
    out_type = (jax.ShapeDtypeStruct((b, n, splits, h, nb), f32),
                jax.ShapeDtypeStruct((b, n, splits, TILE, nb), f32),
                jax.ShapeDtypeStruct((b, n, splits, TILE, nb), f32),
                jax.ShapeDtypeStruct((b, n, splits, TILE, nb), f32))
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=(splits, n, b),
        grid_names=("split", "head", "batch"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(qb, _as_rows(fr.k_words), fr.k_scale.astype(bf16), fr.k_zero.astype(bf16), _as_rows(fr.v_words), fr.v_scale_t.astype(bf16), fr.v_zero_t.astype(bf16),
      lengths)


def _as_rows(words):
    """uint32 [B, N, tiles, W] -> int32 [B, N, tiles, W/128, 128] (TMA boxes hold <= 256 elements a side)."""
    w = lax.bitcast_convert_type(words, jnp.int32)
    return w.reshape(*w.shape[:-1], w.shape[-1] // 128, 128)


def _finish(acc, corr, lsum, m, *, rows_q, gv):
    """Per split: out [B,N,P,rows,H] (normalized) and lse [B,N,P,rows] (natural log)."""
    b, n, p, h, _ = acc.shape
    n_gc = h // gv
    acc = acc[..., : n_gc * rows_q]  # the columns past H/Gv * rows repeat these
    col = corr[..., : n_gc * rows_q].sum(axis=3)  # [B,N,P,H/Gv * rows]
    l = lsum.sum(axis=3)[..., :rows_q]  # [B,N,P,rows] (every value group holds the same sums)
    m2 = m[:, :, :, 0, :rows_q]
    full = (acc + col[:, :, :, None, :]).reshape(b, n, p, h, n_gc, rows_q)
    grp = jnp.arange(h) // gv
    out = jnp.take_along_axis(full, grp[None, None, None, :, None, None], axis=4)[:, :, :, :, 0, :]  # [B,N,P,H,rows]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.swapaxes(out, 3, 4) / l_safe[..., None]
    lse = jnp.where(seen, (m2 + jnp.log2(l_safe)) * math.log(2.0), -jnp.inf)
    return out, lse


def _residual_partial(qr, k_res, v_res, res_lengths, *, t, scale):
    """Attention of the query rows qr [B,N,rows,H] to the residual window (XLA, float32):
    (out [B,N,1,rows,H], lse [B,N,1,rows]); query t sees slots < res_len - (T - 1 - t)."""
    rows = qr.shape[2]
    r = k_res.shape[2]
    sc = jnp.einsum("bnqh,bnrh->bnqr", qr.astype(jnp.float32), k_res.astype(jnp.float32), precision="highest") * scale
    row_t = jnp.arange(rows) // (rows // t)
    limit = res_lengths[:, :, None] - (t - 1 - row_t)[None, None, :]
    sc = jnp.where(jnp.arange(r)[None, None, None, :] < limit[..., None], sc, -jnp.inf)
    m = jnp.max(sc, axis=-1, keepdims=True)
    seen = jnp.isfinite(m)
    p = jnp.exp(sc - jnp.where(seen, m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    out = jnp.einsum("bnqr,bnrh->bnqh", p / jnp.where(seen, l, 1.0), v_res.astype(jnp.float32), precision="highest")
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]
    return out[:, :, None], lse[:, :, None]


def query_columns(q, n: int, gv: int):
    """q [B, T, N*Gq, H] -> (qb [B, N, NB, H]: the T*Gq query rows of each KV head, key channels
    permuted (`key_channel`), repeated to NB = (H/Gv) * rows columns (doubled until a multiple
    of 16): column j is query row j % rows, of value group (j // rows) % (H/Gv); qr [B, N, rows,
    H] unpermuted; rows)."""
    b, t, nq, h = q.shape
    gq = nq // n
    rows_q = t * gq
    qr = q.reshape(b, t, n, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, n, rows_q, h)
    nb = (h // gv) * rows_q
    while nb % 16:  # wgmma's B needs rows of >= 32 bytes: repeat the columns
        nb *= 2
    return jnp.tile(qr[..., key_channel(np.arange(h), h)], (1, 1, nb // rows_q, 1)), qr, rows_q


def check_shapes(q, fr: KiviFragments, bits: int):
    """-> (b, t, nq, h, n, s, gk, gv); raises ValueError naming the value that does not fit."""
    if plgpu is None:
        raise RuntimeError(f"jax {jax.__version__} has no Mosaic GPU Pallas backend")
    if bits not in MGPU_BITS:
        raise ValueError(f"bits={bits} is not supported by the Mosaic GPU KIVI kernel; expected one of {MGPU_BITS}")
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Nq, H]; got shape {q.shape}")
    b, t, nq, h = q.shape
    if q.dtype != jnp.bfloat16:
        raise ValueError(f"q dtype={q.dtype} is not supported by the Mosaic GPU KIVI kernel; expected bfloat16")
    n, tiles = fr.k_words.shape[1], fr.k_words.shape[2]
    s = tiles * TILE
    w = TILE * h * bits // 32
    if fr.k_words.shape != (b, n, tiles, w) or fr.v_words.shape != (b, n, tiles, w):
        raise ValueError(f"k_words{fr.k_words.shape}/v_words{fr.v_words.shape} must be [B, N, S/64, {w}] for "
                         f"bits={bits}, H={h} (from q{q.shape}); build them with to_fragment_layout")
    if nq % n:
        raise ValueError(f"query heads {nq=} must be a multiple of key/value heads {n=}")
    if h % 64 or h > 256:
        raise ValueError(f"head_dim H={h} must be 64, 128, 192 or 256 for the Mosaic GPU KIVI kernel")
    gk = s // fr.k_scale.shape[2]
    gv = h // fr.v_scale_t.shape[2]
    if fr.k_scale.shape != (b, n, s // gk, h) or fr.k_zero.shape != fr.k_scale.shape:
        raise ValueError(f"k_scale{fr.k_scale.shape}/k_zero{fr.k_zero.shape} must be [B, N, S/Gk, H]")
    if fr.v_scale_t.shape != (b, n, h // gv, s) or fr.v_zero_t.shape != fr.v_scale_t.shape:
        raise ValueError(f"v_scale_t{fr.v_scale_t.shape}/v_zero_t{fr.v_zero_t.shape} must be [B, N, H/Gv, S]")
    if not (gk % 16 == 0 and (TILE % gk == 0 or gk % TILE == 0)):
        raise ValueError(f"key group Gk={gk} must be 16, 32, 64 or a multiple of 64 for the Mosaic GPU KIVI kernel")
    rows_q = t * (nq // n)
    if rows_q % 2 or h % gv or gv % 2:
        raise ValueError(f"T * Gq = {rows_q} query rows per KV head must be even and the value group Gv={gv} must "
                         f"divide H={h} for the Mosaic GPU KIVI kernel")
    return b, t, nq, h, n, s, gk, gv


def quantized_decode_attention_mgpu(q, fr: KiviFragments, lengths, *, bits: int, k_res=None, v_res=None,
                                    res_lengths=None, scale: float | None = None, num_splits: int | None = None,
                                    stages: int = 4):
    """KIVI decode attention on Hopper (module doc). q [B, T, Nq, H] bf16; fr: the cache in the
    fragment layout (`to_fragment_layout`); lengths [B] or [B, N] valid quantized tokens; the
    residual window k_res/v_res [B, N, R, H] with res_lengths as in `quantized_decode_attention`.
    Returns (out [B, T, Nq, H] bf16, lse [B, T, Nq] float32)."""
    b, t, nq, h, n, s, gk, gv = check_shapes(q, fr, bits)
    if (k_res is None) != (v_res is None) or (k_res is not None and res_lengths is None):
        raise ValueError("pass k_res, v_res and res_lengths together, or none of them")
    scale = float(h**-0.5 if scale is None else scale)
    tiles = s // TILE
    if num_splits is None:
        num_splits = 1
        while (num_splits * 2 * b * n <= 132 * 8 and tiles % (num_splits * 2) == 0
               and (tiles // (num_splits * 2) * TILE) % gk == 0):
            num_splits *= 2
    if tiles % num_splits or (tiles // num_splits * TILE) % gk:
        raise ValueError(f"S/64 = {tiles} tiles must be a multiple of num_splits={num_splits}, and each split's "
                         f"{tiles // max(num_splits, 1) * TILE} tokens a multiple of the key group Gk={gk}")
    lengths = jnp.minimum(per_head(lengths, b, n, "lengths"), s)
    return _mgpu_jit(q, fr, lengths, k_res, v_res, None if res_lengths is None else per_head(res_lengths, b, n,
                     "res_lengths"), bits=bits, gk=gk, gv=gv, scale=scale, splits=num_splits, stages=stages)


@functools.partial(jax.jit, static_argnames=("bits", "gk", "gv", "scale", "splits", "stages"))
def _mgpu_jit(q, fr, lengths, k_res, v_res, res_lengths, *, bits, gk, gv, scale, splits, stages):
    b, t, nq, h = q.shape
    n = fr.k_words.shape[1]
    gq = nq // n
    qb, qr, rows_q = query_columns(q, n, gv)
    acc, corr, lsum, m = _kernel_partials(qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_q, splits=splits,
                                          scale=scale, stages=stages)
    out, lse = _finish(acc, corr, lsum, m, rows_q=rows_q, gv=gv)
    if k_res is not None:
        ro, rl = _residual_partial(qr, k_res, v_res, jnp.minimum(res_lengths, k_res.shape[2]), t=t, scale=scale)
        out, lse = jnp.concatenate([out, ro], axis=2), jnp.concatenate([lse, rl], axis=2)
    out, lse = merge_splits(out, lse)
    out = out.reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, nq, h)
    lse = lse.reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, nq)
    return out.astype(q.dtype), lse
