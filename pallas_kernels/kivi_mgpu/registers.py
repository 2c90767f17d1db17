"""Register-level pieces of the Hopper KIVI decode kernel (`kernel.py`), written with Mosaic GPU's
FragmentedArray API inside `plgpu.inline_mgpu`: loading a thread's words, turning codes into bf16
pairs (f16 for 8-bit codes) with one `lop3` (inline PTX), and building WGMMA-layout arrays
register by register (folding the key scales into the query: `fold.py`, which shares the MLIR
helpers here: `mlir_modules`, `thread_coords`, `as_index`, `asm`).
"""

from __future__ import annotations

import numpy as np

from .fragments import TILE, register_of

_MAGIC = 0x43004300  # two bf16 128.0: OR-ing a code < 128 into the mantissa gives 128 + code
_MAGIC_F16 = 0x64006400  # two f16 1024.0: the same for a code < 1024 (8-bit codes)


def code_base(bits: int) -> float:
    """The base that `lop3` ORs codes into: bf16 128 for 2- and 4-bit codes, f16 1024 for 8-bit
    ones (`fragments.operand_dtype`)."""
    return 1024.0 if bits == 8 else 128.0


def _magic(bits: int) -> int:
    return _MAGIC_F16 if bits == 8 else _MAGIC


def _x2(bits: int) -> str:
    """The PTX packed type of the operands: bf16x2, or f16x2 for 8-bit codes."""
    return "f16x2" if bits == 8 else "bf16x2"


def mlir_modules():
    import jax.experimental.mosaic.gpu as mgpu
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, vector
    from jax.experimental.mosaic.gpu import fragmented_array as fa
    from jax.experimental.mosaic.gpu import utils

    return ir, arith, gpu, llvm, vector, mgpu, fa, utils


def thread_coords():
    ir, arith, gpu, _, _, _, _, utils = mlir_modules()
    i32 = ir.IntegerType.get_signless(32)
    tid = arith.index_cast(i32, gpu.thread_id(gpu.Dimension.x))
    tid = arith.remui(tid, utils.c(128, i32))
    return tid, arith.divui(tid, utils.c(32, i32)), arith.remui(tid, utils.c(32, i32))


def as_index(x):
    ir, arith, *_ = mlir_modules()
    return arith.index_cast(ir.IndexType.get(), x)


def _load_words(ref, row0, tid, words):
    """This thread's `words` consecutive int32 words of a tile stored as rows [row0, row0 +
    words) of 128 words (16-byte loads; 8-byte ones when a thread has only 2 words)."""
    ir, arith, _, _, vector, _, _, utils = mlir_modules()
    i32 = ir.IntegerType.get_signless(32)
    out = []
    width = min(words, 4)
    for v in range(words // width):
        off = arith.addi(arith.muli(tid, utils.c(words, i32)), utils.c(width * v, i32))
        row = arith.addi(arith.divui(off, utils.c(128, i32)), utils.c(row0, i32))
        col = arith.remui(off, utils.c(128, i32))
        vec = vector.load(ir.VectorType.get((width,), i32), ref, [as_index(row), as_index(col)])
        out += [vector.extract(vec, [], [k]) for k in range(width)]
    return out


def asm(ret_ty, args, body, constraints):
    _, _, _, llvm, *_ = mlir_modules()
    return llvm.inline_asm(ret_ty, args, body, constraints)


def code_position(bits: int, i: int):
    """Where the kernel reads code position i of a word: (shift, offset). The word shifted right
    by `shift` holds the code at bits offset (and 16 + offset), and OR-ing it into the mantissa of
    128.0 gives 128 + 2^offset * code (exact: below 256). 2-bit codes: three shifts a word (0, 6,
    12) serve its eight positions, with factors 1, 4, 16; wider codes: one shift a position."""
    if bits == 2:
        return 6 * (i // 3), 2 * (i % 3)
    return bits * i, 0


def value_code_position(bits: int, i: int):
    """`code_position` for the value codes: (shift, offset), a negative shift meaning a left shift.
    The value product accumulates 128 + f * code and takes the 128 out only after the loop (the
    column sums), so its float32 error grows with 128 / f: values sit high in the mantissa (2-bit
    codes at offsets 2 and 4, f = 4 and 16, four shifts a word; 4-bit codes at offset 3, f = 8,
    one shift a position as before), four times less offset than `code_position`'s f = 1 for
    2-bit codes and eight times less for 4-bit ones; 8-bit codes at offset 1 (f16: 1024 + 2 *
    code < 2048)."""
    if bits == 2:
        offset = 2 + 2 * (i % 2)
        return 2 * i - offset, offset
    offset = 1 if bits == 8 else 3
    return bits * i - offset, offset


def _shifted(word, shift):
    """word >> shift (a left shift for a negative one), as i32."""
    ir, arith, *_, utils = mlir_modules()
    i32 = ir.IntegerType.get_signless(32)
    if shift > 0:
        return arith.shrui(word, utils.c(shift, i32))
    return arith.shli(word, utils.c(-shift, i32)) if shift else word


def _x2_imm(x: float, bits: int = 2) -> int:
    """Two copies of float x (exact in the operand type: bf16, f16 for 8-bit codes) as one 32-bit
    immediate."""
    if bits == 8:
        return int(np.array(x, np.float16).view(np.uint16)) * 0x00010001
    hi = int(np.array(x, np.float32).view(np.uint32)) >> 16
    return hi * 0x00010001


def _code_pair(src, offset, bits):
    """bf16x2 (f16x2 for 8-bit codes; as i32) base + 2^offset * code for the codes at bits
    `offset` and 16 + `offset` of `src` (`code_base`)."""
    ir, *_ = mlir_modules()
    i32 = ir.IntegerType.get_signless(32)
    mask = ((1 << bits) - 1) * 0x00010001 << offset
    return asm(i32, [src], f"lop3.b32 $0, $1, {mask:#x}, {_magic(bits):#x}, 0xEA;", "=r,r")


def _exact_ptx(offset: int, dst: str, bits: int) -> str:
    """PTX taking t = base + f * code (f = 2^offset, `code_base`; bf16x2 or f16x2) to the code
    exactly, into `dst`: `sub` the base when f = 1, else `fma` by 1/f and -base/f (powers of 2:
    no rounding). Uses scratch m, c."""
    f, base, x2 = 1 << offset, code_base(bits), _x2(bits)
    if f == 1:
        return f"mov.b32 m, {_magic(bits):#x}; sub.rn.{x2} {dst}, t, m;"
    return (
        f"mov.b32 m, {_x2_imm(1.0 / f, bits):#x}; mov.b32 c, {_x2_imm(-base / f, bits):#x}; fma.rn.{x2} {dst}, t, m, c;"
    )


def _dequant_pair(src, offset, bits, s2, z2):
    """bf16x2 (f16x2 for 8-bit codes; as i32) code * s + z (one rounding) for the codes at bits
    `offset` / 16 + `offset` of `src`: lop3, the exact code (`_exact_ptx`), then `fma` with the
    scale and zero."""
    ir, *_ = mlir_modules()
    i32 = ir.IntegerType.get_signless(32)
    mask = ((1 << bits) - 1) * 0x00010001 << offset
    body = (
        f"{{ .reg .b32 t, m, c; lop3.b32 t, $1, {mask:#x}, {_magic(bits):#x}, 0xEA; "
        f"{_exact_ptx(offset, 't', bits)} fma.rn.{_x2(bits)} $0, t, $2, $3; }}"
    )
    return asm(i32, [src, s2, z2], body, "=r,r,r,r")


def unpack_fn(m_rows, k_cols, bits, gk, h, t, kv, k_rows_per_step):
    """inline_mgpu body for tile `t` of a pipeline step: (words ref [rows, 128][, k_sz ref
    [groups, 2, H]]) -> [m_rows, k_cols] in the operand type (bf16; f16 for 8-bit codes) in the
    WGMMA layout. kv=0 (keys) with the k_sz ref:
    code * s + z; without it (`fold_query_fn` scales the query): 128 + f * code straight from
    `lop3`, f = 2^offset of `code_position` (a power of 4 that depends on the key channel's
    column tile, which the folded query divides out); kv=1 (values): 128 + f * code, f = 2^offset
    of `value_code_position` (it depends on the token's group of 8, and `expand_fn` takes it out
    through the value scales)."""
    r = 16 // bits
    col_tiles = k_cols // 8
    words = (m_rows // 64) * col_tiles * 2 // r
    row0 = (2 * t + kv) * words  # words of a tile: [128 threads * words] = `words` rows of 128

    def fn(ctx, words_ref, *scale_refs):
        ir, arith, _, _, vector, mgpu, fa, utils = mlir_modules()
        i32 = ir.IntegerType.get_signless(32)
        bf16 = ir.F16Type.get() if bits == 8 else ir.BF16Type.get()  # the operand type
        tid, warp, lane = thread_coords()
        ws = _load_words(words_ref, row0, tid, words)
        pairs = None
        if scale_refs:
            (sz_ref,) = scale_refs
            q = arith.remui(lane, utils.c(4, i32))
            if gk >= TILE:  # one group a tile: row (t*64)//gk of this step's block
                g = utils.c((t * TILE) // gk % k_rows_per_step, i32)
            else:
                g = arith.addi(
                    utils.c(t * (TILE // gk), i32), arith.divui(arith.muli(warp, utils.c(16, i32)), utils.c(gk, i32))
                )
            base = arith.muli(q, utils.c(8, i32))
            pairs = []
            for which in (0, 1):
                vals = []
                for v in range(h // 32):  # H/4 channels = H/32 chunks of 8: chunk 4v + q (`key_channel`)
                    off = arith.addi(base, utils.c(32 * v, i32))
                    vec = vector.load(
                        ir.VectorType.get((8,), bf16),
                        sz_ref,
                        [as_index(g), as_index(utils.c(which, i32)), as_index(off)],
                    )
                    for p in range(4):
                        two = vector.extract_strided_slice(ir.VectorType.get((2,), bf16), vec, [2 * p], [2], [1])
                        vals.append(utils.bitcast(two, i32))
                pairs.append(vals)
        shape = fa.WGMMA_LAYOUT.registers_shape((m_rows, k_cols))
        regs = np.empty(shape, dtype=object)
        for m in range(words):
            shifted = {}
            for i in range(r):
                rt, half, j = register_of(m * r + i, col_tiles)
                shift, offset = (value_code_position if kv else code_position)(bits, i)
                if shift not in shifted:
                    shifted[shift] = _shifted(ws[m], shift)
                if pairs is None:  # values, and keys whose scales are folded into the query
                    x = _code_pair(shifted[shift], offset, bits)
                else:
                    x = _dequant_pair(shifted[shift], offset, bits, pairs[0][j], pairs[1][j])
                idx = [0] * len(shape)
                idx[0], idx[1], idx[4] = rt, j, half
                regs[tuple(idx)] = utils.bitcast(x, ir.VectorType.get((2,), bf16))
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return fn


def expand_fn(nb, rows_q, n_gc, t, which, bits):
    """inline_mgpu body: v_sz ref [tiles * H/Gv, 128] (a step's tiles, each tile's [(scale, zero),
    64 tokens, H/Gv groups] in H/Gv rows of 128) -> f32 [64, NB] in the WGMMA layout with
    element (r, j) = tile t's per-token value-group scale (which=0) or zero (1) of token r and
    group (j // rows_q) % (H/Gv). The threads of a warp read 8 tokens and two neighbouring groups:
    words of distinct banks (with tokens last, a group's tokens would fill a 128-byte row and the
    two groups meet in the same banks). A thread's second token is read at an immediate offset
    from its first (computing both addresses takes 2 more registers, which would cost the KIVI-2
    kernel its fourth CTA per SM). Scales are divided by the factor 2^offset that `unpack_fn` leaves on the value codes of
    token r (`value_code_position` of the token's group of 8, r // 8)."""

    def fn(ctx, ref):
        ir, arith, _, _, vector, mgpu, fa, utils = mlir_modules()
        from jax._src.lib.mlir.dialects import memref

        i32 = ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        _, warp, lane = thread_coords()
        q = arith.remui(lane, utils.c(4, i32))
        row0 = arith.addi(arith.muli(warp, utils.c(16, i32)), arith.divui(lane, utils.c(4, i32)))
        shape = fa.WGMMA_LAYOUT.registers_shape((64, nb))
        regs = np.empty(shape, dtype=object)
        inv = [None, None]
        if which == 0:
            const = lambda x: arith.constant(f32, ir.FloatAttr.get(f32, x))
            for half in range(2):  # this thread's token groups 2 warp + half: 1 / 2^offset
                grp8 = arith.addi(arith.muli(warp, utils.c(2, i32)), utils.c(half, i32))
                inv[half] = const(1.0)
                for i in range(16 // bits):
                    if value_code_position(bits, i)[1]:
                        hit = arith.cmpi(
                            arith.CmpIPredicate.eq, arith.remui(grp8, utils.c(16 // bits, i32)), utils.c(i, i32)
                        )
                        inv[half] = arith.select(hit, const(2.0 ** -value_code_position(bits, i)[1]), inv[half])
        loaded = {}
        tpr = 128 // n_gc if 128 % n_gc == 0 else 0  # tokens a row of 128
        if tpr >= 16:
            tok_col = arith.muli(arith.remui(row0, utils.c(tpr, i32)), utils.c(n_gc, i32))
        for jt in range(nb // 8):
            col = arith.addi(utils.c(8 * jt, i32), arith.muli(q, utils.c(2, i32)))
            grp = arith.remui(arith.divui(col, utils.c(rows_q, i32)), utils.c(n_gc, i32))
            for half in range(2):
                key = (0 if n_gc == 1 else jt, half)  # one group: every column tile reads the same word
                if key not in loaded:
                    tok = arith.addi(row0, utils.c(8 * half, i32))
                    base = t * 128 * n_gc + which * 64 * n_gc  # the tile's scales or zeros, flat
                    if tpr >= 16:  # a thread's two tokens (row0, row0 + 8) share a row: the second's
                        # column is the first's plus a constant (an immediate offset, no register)
                        row = arith.addi(utils.c(base // 128, i32), arith.divui(row0, utils.c(tpr, i32)))
                        col = arith.addi(arith.addi(tok_col, grp), utils.c(base % 128 + 8 * half * n_gc, i32))
                    else:
                        flat = arith.addi(utils.c(base, i32), arith.addi(arith.muli(tok, utils.c(n_gc, i32)), grp))
                        row, col = arith.divui(flat, utils.c(128, i32)), arith.remui(flat, utils.c(128, i32))
                    loaded[key] = arith.extf(f32, memref.load(ref, [as_index(row), as_index(col)]))
                x = loaded[key]
                if inv[half] is not None:
                    x = arith.mulf(x, inv[half])
                idx = [0] * len(shape)
                idx[1], idx[4] = jt, half
                regs[tuple(idx)] = vector.broadcast(ir.VectorType.get((2,), f32), x)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return fn


def tile_fn(reps: int):
    """inline_mgpu body: a WGMMA-layout [64, N] (or WGMMA_COL [N]) array -> its columns repeated
    `reps` times (no instructions: the registers are reused)."""

    def fn(ctx, x):
        _, _, _, _, _, mgpu, _, _ = mlir_modules()
        axis = 1 if len(x.shape) == 2 else 0
        regs = np.concatenate([x.registers] * reps, axis=axis)
        return mgpu.FragmentedArray(_registers=regs, _layout=x.layout, _is_signed=x.is_signed)

    return fn


def warp_sums_fn():
    """inline_mgpu body: x [64, N] f32 WGMMA layout -> the same array with each element replaced
    by its column's sum over its warp's 16 rows (warp w holds rows 16w ... 16w + 15): the two rows
    a thread holds added, then butterfly shuffles across the 8 lanes that hold the same columns
    (xor 4, 8, 16). Registers and shuffles only: a cross-warp `.sum(axis=0)` takes shared memory,
    which would cost the kernel its fourth CTA per SM."""

    def fn(ctx, x):
        ir, arith, _, _, vector, mgpu, _, utils = mlir_modules()
        regs = np.empty(x.registers.shape, dtype=object)
        for jt in range(x.registers.shape[1]):  # column tile: the other indices are rows
            idxs = [idx for idx in np.ndindex(x.registers.shape) if idx[1] == jt]
            tot = x.registers[idxs[0]]
            for idx in idxs[1:]:
                tot = arith.addf(tot, x.registers[idx])
            elems = [vector.extract(tot, [], [e]) for e in range(ir.VectorType(tot.type).shape[0])]
            for sh in (4, 8, 16):
                elems = [arith.addf(v, utils.shfl_bfly(v, sh)) for v in elems]
            tot = vector.from_elements(tot.type, elems)
            for idx in idxs:
                regs[idx] = tot
        return mgpu.FragmentedArray(_registers=regs, _layout=x.layout, _is_signed=None)

    return fn


def commit_any_fn(tau: float):
    """inline_mgpu body: (s, mb [64, NS] f32 WGMMA layout, flag ref [1] int32) -> nothing.
    Commits this thread's shared-memory writes for the tensor cores (`fence.proxy.async`) and
    passes the warpgroup barrier with a reduction (`bar.red.or.pred`): every thread learns
    whether any thread holds a score s > mb + tau, and stores that (0 or 1) in flag[0]. This is
    `plgpu.commit_smem()` with the "does the running max need an update" vote folded into its
    barrier (every thread writes the same value, after the barrier, so the stores agree)."""

    def fn(ctx, s, mb, flag_ref):
        ir, arith, _, _, vector, _, _, utils = mlir_modules()
        from jax._src.lib.mlir.dialects import memref

        i32 = ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        limit = arith.constant(f32, ir.FloatAttr.get(f32, float(tau)))
        over = utils.c(0, i32)
        for idx in np.ndindex(s.registers.shape):
            a, b = s.registers[idx], mb.registers[idx]
            for k in range(ir.VectorType(a.type).shape[0]):
                x = vector.extract(a, [], [k])
                y = arith.addf(vector.extract(b, [], [k]), limit)
                over = arith.ori(over, arith.extui(i32, arith.cmpf(arith.CmpFPredicate.OGT, x, y)))
        body = (
            "{ .reg .pred p, q; setp.ne.u32 p, $1, 0; fence.proxy.async.shared::cta; "
            "bar.red.or.pred q, 1, 128, p; selp.u32 $0, 1, 0, q; }"
        )
        flag = asm(i32, [over], body, "=r,r")
        memref.store(flag, flag_ref, [as_index(utils.c(0, i32))])

    return fn
