"""Register-level pieces of the Hopper KIVI decode kernel (`quantized_decode_attention_mgpu.py`),
written with Mosaic GPU's FragmentedArray API inside `plgpu.inline_mgpu`: loading a thread's
words, turning codes into bf16 pairs with one `lop3` (inline PTX), and building WGMMA-layout
arrays register by register.
"""

from __future__ import annotations

import numpy as np

from .kivi_fragments import TILE, register_of

_MAGIC = 0x43004300  # two bf16 128.0: OR-ing a code < 128 into the mantissa gives 128 + code

def _mgpu():
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith, gpu, llvm, vector
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


def _load_words(ref, row0, tid, words):
    """This thread's `words` consecutive int32 words of a tile stored as rows [row0, row0 +
    words) of 128 words (16-byte loads; 8-byte ones when a thread has only 2 words)."""
    ir, arith, _, _, vector, _, _, utils = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    out = []
    width = min(words, 4)
    for v in range(words // width):
        off = arith.addi(arith.muli(tid, utils.c(words, i32)), utils.c(width * v, i32))
        row = arith.addi(arith.divui(off, utils.c(128, i32)), utils.c(row0, i32))
        col = arith.remui(off, utils.c(128, i32))
        vec = vector.load(ir.VectorType.get((width,), i32), ref, [_idx(row), _idx(col)])
        out += [vector.extract(vec, [], [k]) for k in range(width)]
    return out


def _asm(ret_ty, args, body, constraints):
    _, _, _, llvm, *_ = _mgpu()
    return llvm.inline_asm(ret_ty, args, body, constraints)


def code_position(bits: int, i: int):
    """Where the kernel reads code position i of a word: (shift, offset). The word shifted right
    by `shift` holds the code at bits offset (and 16 + offset), and OR-ing it into the mantissa of
    128.0 gives 128 + 2^offset * code (exact: below 256). 2-bit codes: three shifts a word (0, 6,
    12) serve its eight positions, with factors 1, 4, 16; wider codes: one shift a position."""
    if bits == 2:
        return 6 * (i // 3), 2 * (i % 3)
    return bits * i, 0


def _bf16x2(x: float) -> int:
    """Two copies of float x (exact in bf16) as one 32-bit immediate."""
    hi = int(np.array(x, np.float32).view(np.uint32)) >> 16
    return hi * 0x00010001


def _code_pair(src, offset, bits):
    """bf16x2 (as i32) 128 + 2^offset * code for the codes at bits `offset` and 16 + `offset` of `src`."""
    ir, *_ = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    mask = ((1 << bits) - 1) * 0x00010001 << offset
    return _asm(i32, [src], f"lop3.b32 $0, $1, {mask:#x}, {_MAGIC:#x}, 0xEA;", "=r,r")


def _exact_ptx(offset: int, dst: str) -> str:
    """PTX taking t = bf16x2 128 + f * code (f = 2^offset) to the code exactly, into `dst`: `sub`
    128 when f = 1, else `fma` by 1/f and -128/f (powers of 2: no rounding). Uses scratch m, c."""
    f = 1 << offset
    if f == 1:
        return f"mov.b32 m, {_MAGIC:#x}; sub.rn.bf16x2 {dst}, t, m;"
    return f"mov.b32 m, {_bf16x2(1.0 / f):#x}; mov.b32 c, {_bf16x2(-128.0 / f):#x}; fma.rn.bf16x2 {dst}, t, m, c;"


def _dequant_pair(src, offset, bits, s2, z2):
    """bf16x2 (as i32) code * s + z (one rounding) for the codes at bits `offset` / 16 + `offset`
    of `src`: lop3, the exact code (`_exact_ptx`), then `fma` with the scale and zero."""
    ir, *_ = _mgpu()
    i32 = ir.IntegerType.get_signless(32)
    mask = ((1 << bits) - 1) * 0x00010001 << offset
    body = (f"{{ .reg .b32 t, m, c; lop3.b32 t, $1, {mask:#x}, {_MAGIC:#x}, 0xEA; {_exact_ptx(offset, 't')} "
            f"fma.rn.bf16x2 $0, t, $2, $3; }}")
    return _asm(i32, [src, s2, z2], body, "=r,r,r,r")


def unpack_fn(m_rows, k_cols, bits, gk, h, t, kv, k_rows_per_step):
    """inline_mgpu body for tile `t` of a pipeline step: (words ref [rows, 128][, k_sz ref
    [groups, 2, H]]) -> bf16 [m_rows, k_cols] in the WGMMA layout. kv=0 (keys) with the k_sz ref:
    code * s + z; without it (`fold_query_fn` scales the query): 128 + f * code straight from
    `lop3`, f = 2^offset of `code_position` (a power of 4 that depends on the column tile: the
    key channel's tile, which the folded query divides out; the token's group of 8 for values,
    which `expand_fn` takes out through the value scales); kv=1 (values): 128 + f * code."""
    r = 16 // bits
    col_tiles = k_cols // 8
    words = (m_rows // 64) * col_tiles * 2 // r
    row0 = (2 * t + kv) * words  # words of a tile: [128 threads * words] = `words` rows of 128

    def fn(ctx, words_ref, *scale_refs):
        ir, arith, _, _, vector, mgpu, fa, utils = _mgpu()
        i32 = ir.IntegerType.get_signless(32)
        bf16 = ir.BF16Type.get()
        tid, warp, lane = _thread_coords()
        ws = _load_words(words_ref, row0, tid, words)
        pairs = None
        if scale_refs:
            (sz_ref,) = scale_refs
            q = arith.remui(lane, utils.c(4, i32))
            if gk >= TILE:  # one group a tile: row (t*64)//gk of this step's block
                g = utils.c((t * TILE) // gk % k_rows_per_step, i32)
            else:
                g = arith.addi(utils.c(t * (TILE // gk), i32),
                               arith.divui(arith.muli(warp, utils.c(16, i32)), utils.c(gk, i32)))
            base = arith.muli(q, utils.c(h // 4, i32))
            pairs = []
            for which in (0, 1):
                vals = []
                for v in range(h // 32):  # H/4 channels = H/32 vectors of 8
                    off = arith.addi(base, utils.c(8 * v, i32))
                    vec = vector.load(ir.VectorType.get((8,), bf16), sz_ref,
                                      [_idx(g), _idx(utils.c(which, i32)), _idx(off)])
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
                shift, offset = code_position(bits, i)
                if shift not in shifted:
                    shifted[shift] = arith.shrui(ws[m], utils.c(shift, i32)) if shift else ws[m]
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
    """inline_mgpu body: v_sz ref [tiles * 2 * H/Gv, 64] bf16 (tile-major rows) -> f32 [64, NB]
    in the WGMMA layout with element (r, j) = ref[(2 t + which) H/Gv + (j // rows_q) % (H/Gv), r]
    (tile t's per-token value-group scale (which=0) or zero (1) for every column of its group).
    Scales are divided by the factor 2^offset that `unpack_fn` leaves on the value codes of token
    r (`code_position` of the token's group of 8, r // 8)."""

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
        inv = [None, None]
        if which == 0 and any(code_position(bits, i)[1] for i in range(16 // bits)):
            const = lambda x: arith.constant(f32, ir.FloatAttr.get(f32, x))  # noqa: E731
            for half in range(2):  # this thread's token groups 2 warp + half: 1 / 2^offset
                grp8 = arith.addi(arith.muli(warp, utils.c(2, i32)), utils.c(half, i32))
                inv[half] = const(1.0)
                for i in range(16 // bits):
                    if code_position(bits, i)[1]:
                        hit = arith.cmpi(arith.CmpIPredicate.eq, arith.remui(grp8, utils.c(16 // bits, i32)),
                                         utils.c(i, i32))
                        inv[half] = arith.select(hit, const(2.0 ** -code_position(bits, i)[1]), inv[half])
        for jt in range(nb // 8):
            col = arith.addi(utils.c(8 * jt, i32), arith.muli(q, utils.c(2, i32)))
            grp = arith.remui(arith.divui(col, utils.c(rows_q, i32)), utils.c(n_gc, i32))
            for half in range(2):
                row = arith.addi(row0, utils.c(8 * half, i32))
                grp_row = arith.addi(grp, utils.c((2 * t + which) * n_gc, i32))
                x = arith.extf(f32, memref.load(ref, [_idx(grp_row), _idx(row)]))
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
        _, _, _, _, _, mgpu, _, _ = _mgpu()
        axis = 1 if len(x.shape) == 2 else 0
        regs = np.concatenate([x.registers] * reps, axis=axis)
        return mgpu.FragmentedArray(_registers=regs, _layout=x.layout, _is_signed=x.is_signed)

    return fn


def commit_any_fn(tau: float):
    """inline_mgpu body: (s, mb [64, NS] f32 WGMMA layout, flag ref [1] int32) -> nothing.
    Commits this thread's shared-memory writes for the tensor cores (`fence.proxy.async`) and
    passes the warpgroup barrier with a reduction (`bar.red.or.pred`): every thread learns
    whether any thread holds a score s > mb + tau, and stores that (0 or 1) in flag[0]. This is
    `plgpu.commit_smem()` with the "does the running max need an update" vote folded into its
    barrier (every thread writes the same value, after the barrier, so the stores agree)."""

    def fn(ctx, s, mb, flag_ref):
        ir, arith, _, _, vector, _, _, utils = _mgpu()
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
        body = ("{ .reg .pred p, q; setp.ne.u32 p, $1, 0; fence.proxy.async.shared::cta; "
                "bar.red.or.pred q, 1, 128, p; selp.u32 $0, 1, 0, q; }")
        flag = _asm(i32, [over], body, "=r,r")
        memref.store(flag, flag_ref, [_idx(utils.c(0, i32))])

    return fn


def _swizzled(row, col):
    """(tile row, tile col, row, col) indices of element (row, col) of a [rows, width] bf16 array
    stored with TilingTransform((8, 64)) + SwizzleTransform(128): 16-byte chunks of each 128-byte
    row XOR-ed with the row index mod 8 (the layout `wgmma` reads B from)."""
    _, arith, _, _, _, _, _, utils = _mgpu()
    i32 = row.type
    chunk = arith.xori(arith.divui(arith.remui(col, utils.c(64, i32)), utils.c(8, i32)),
                       arith.remui(row, utils.c(8, i32)))
    return [_idx(arith.divui(row, utils.c(8, i32))), _idx(arith.divui(col, utils.c(64, i32))),
            _idx(arith.remui(row, utils.c(8, i32))), _idx(arith.muli(chunk, utils.c(8, i32)))]


def key_offsets(bits: int, h: int) -> list[int]:
    """log2 of the factor f that `unpack_fn` leaves on the key codes of each wgmma column tile
    (H/8 tiles): tile j is read from word position j % R (`register_of`), so f = 2^offset of
    `code_position(bits, j % R)`."""
    r = 16 // bits
    if (h // 8) % r:
        raise ValueError(f"H/8 = {h // 8} column tiles must be a multiple of {r} codes a word")
    return [code_position(bits, j % r)[1] for j in range(h // 8)]


def fold_columns(rows_p: int, gk: int) -> int:
    """Columns of the key product when the scales are folded into the query: the padded query
    rows once per key group of a 64-token tile (Gk < 64 puts 64/Gk groups in a tile), at least 8
    (wgmma's smallest N; fewer are repeated)."""
    return max(8, max(1, TILE // gk) * rows_p) if rows_p < 8 else max(1, TILE // gk) * rows_p


def fold_query_fn(ns, h, t, gk, k_rows_per_step, rows_p, bits):
    """inline_mgpu body: (q ref [NS, H], k_sz ref [groups, 2, H], bk ref [NS, H] (both swizzled
    as `_swizzled`), zq ref [NS] f32) -> nothing. For the key groups of tile `t` (row j of bk
    serves group (j // rows_p) % (64/Gk) of the tile and query row j % rows_p), writes
    bk[j, k] = bf16(q[j, k] * s[channel(k)]) / f(k) (the key scales folded into the query, and
    the factor `unpack_fn` leaves on the codes of column tile k // 8 divided out: keys enter the
    product as 128 + f * code straight from `lop3`) and zq[j] = sum_k q[j, k] * z[channel(k)] -
    128 * bk[j, k] (float32: the zero points' part of the scores and the codes' offset),
    channel(k) = `kivi_fragments.key_channel`. Each thread handles 16-byte chunks of 8 K
    positions (one column tile); the 16 or 32 threads of a row sum zq by shuffles. The caller
    commits (fence + barrier) before `wgmma` reads bk."""
    chunks_row = h // 8
    per_thread = ns * h // 8 // 128
    lanes = min(32, chunks_row)
    ng = max(1, TILE // gk)
    offsets = key_offsets(bits, h)
    r = 16 // bits
    table = sum(off << (3 * j) for j, off in enumerate(offsets[:r]))  # offset of column tile j, 3 bits each

    def fn(ctx, q_ref, sz_ref, bk_ref, zq_ref):
        ir, arith, _, _, vector, _, _, utils = _mgpu()
        from jax._src.lib.mlir.dialects import memref

        i32 = ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        bf16 = ir.BF16Type.get()
        v2 = ir.VectorType.get((2,), bf16)
        v8 = ir.VectorType.get((8,), bf16)
        minus128 = arith.constant(f32, ir.FloatAttr.get(f32, -128.0))
        tid, _, lane = _thread_coords()
        g0 = utils.c((t * TILE) // gk % k_rows_per_step, i32)
        for k in range(per_thread):
            c = arith.addi(tid, utils.c(128 * k, i32))
            row, kc = arith.divui(c, utils.c(chunks_row, i32)), arith.remui(c, utils.c(chunks_row, i32))
            g = g0 if ng == 1 else arith.addi(g0, arith.remui(arith.divui(row, utils.c(rows_p, i32)), utils.c(ng, i32)))
            inv2 = None
            if any(offsets):  # bf16x2 1 / f of this chunk's column tile: exponent 127 - offset
                off = arith.andi(arith.shrui(utils.c(table, i32), arith.muli(arith.remui(kc, utils.c(r, i32)),
                                                                              utils.c(3, i32))), utils.c(7, i32))
                hi = arith.subi(utils.c(0x3F80, i32), arith.shli(off, utils.c(7, i32)))
                inv2 = arith.ori(hi, arith.shli(hi, utils.c(16, i32)))
            at = _swizzled(row, arith.muli(kc, utils.c(8, i32)))
            qv = vector.load(v8, q_ref, at)
            out, zsum = [], None
            for qq in range(4):  # K positions 8 kc + 2 qq + e hold channels qq H/4 + 2 kc + e
                ch = _idx(arith.addi(utils.c(qq * (h // 4), i32), arith.muli(kc, utils.c(2, i32))))
                s2 = utils.bitcast(vector.load(v2, sz_ref, [_idx(g), _idx(utils.c(0, i32)), ch]), i32)
                z2 = vector.load(v2, sz_ref, [_idx(g), _idx(utils.c(1, i32)), ch])
                q2 = vector.extract_strided_slice(v2, qv, [2 * qq], [2], [1])
                if inv2 is not None:  # s / f: exact (a power of 2)
                    s2 = _asm(i32, [s2, inv2], "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r")
                b2 = _asm(i32, [utils.bitcast(q2, i32), s2], "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r")
                out.append(b2)
                bv = utils.bitcast(b2, v2)
                for e in range(2):
                    prod = arith.mulf(arith.extf(f32, vector.extract(q2, [], [e])),
                                      arith.extf(f32, vector.extract(z2, [], [e])))
                    prod = arith.addf(prod, arith.mulf(minus128, arith.extf(f32, vector.extract(bv, [], [e]))))
                    zsum = prod if zsum is None else arith.addf(zsum, prod)
            packed = vector.from_elements(ir.VectorType.get((4,), i32), out)
            vector.store(utils.bitcast(packed, v8), bk_ref, at)
            for sh in (1, 2, 4, 8, 16)[: lanes.bit_length() - 1]:
                zsum = arith.addf(zsum, utils.shfl_bfly(zsum, sh))
            first = arith.cmpi(arith.CmpIPredicate.eq, arith.remui(lane, utils.c(lanes, i32)), utils.c(0, i32))
            with utils.when(first):
                memref.store(zsum, zq_ref, [_idx(row)])

    return fn


def group_columns_fn(ns, rows_p, gk):
    """inline_mgpu body: s [64, `fold_columns`] f32 WGMMA layout (column c = the scores of query
    row c % rows_p against key group (c // rows_p) % (64/Gk) of the tile) -> [64, NS] with column
    j = query row j % rows_p against the group of the thread's own tokens (warp w holds tokens
    16w ... 16w + 15, in group 16w // Gk): a register choice per warp, and for rows_p < 8 a
    shuffle within each group of 4 lanes (the column pairs of a row sit on 4 lanes)."""
    ng = TILE // gk

    def fn(ctx, s):
        ir, arith, _, _, vector, mgpu, fa, utils = _mgpu()
        i32 = ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        _, warp, lane = _thread_coords()
        gw = arith.divui(arith.muli(warp, utils.c(16, i32)), utils.c(gk, i32))
        is_g = [arith.cmpi(arith.CmpIPredicate.eq, gw, utils.c(g, i32)) for g in range(ng)]

        def choose(cands):
            v = cands[0]
            for g in range(1, ng):
                if cands[g] is not cands[0]:
                    v = arith.select(is_g[g], cands[g], v)
            return v

        src = None
        if rows_p < 8:  # source lane: column (gw rows_p) % 8 + (2 q) % rows_p of the row's 4 lanes
            q = arith.remui(lane, utils.c(4, i32))
            col = arith.addi(arith.remui(arith.muli(gw, utils.c(rows_p, i32)), utils.c(8, i32)),
                             arith.remui(arith.muli(q, utils.c(2, i32)), utils.c(rows_p, i32)))
            src = arith.ori(arith.andi(lane, utils.c(-4, i32)), arith.divui(col, utils.c(2, i32)))
        shape = fa.WGMMA_LAYOUT.registers_shape((64, ns))
        regs = np.empty(shape, dtype=object)
        for idx in np.ndindex(shape):
            jt = idx[1]
            if rows_p % 8 == 0:
                regs[idx] = choose([s.registers[(idx[0], g * rows_p // 8 + jt, *idx[2:])] for g in range(ng)])
                continue
            v = choose([s.registers[(idx[0], g * rows_p // 8, *idx[2:])] for g in range(ng)])
            elems = []
            for e in range(2):
                x = utils.bitcast(vector.extract(v, [], [e]), i32)
                x = _asm(i32, [x, src], "shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r")
                elems.append(utils.bitcast(x, f32))
            regs[idx] = vector.from_elements(ir.VectorType.get((2,), f32), elems)
        return mgpu.FragmentedArray(_registers=regs, _layout=fa.WGMMA_LAYOUT, _is_signed=None)

    return fn


def add_columns_fn(ns):
    """inline_mgpu body: (s [64, NS] f32 WGMMA layout, zq ref [NS] f32) -> s + zq[column]."""

    def fn(ctx, s, zq_ref):
        ir, arith, _, _, vector, mgpu, fa, utils = _mgpu()
        i32 = ir.IntegerType.get_signless(32)
        _, _, lane = _thread_coords()
        regs = np.empty(s.registers.shape, dtype=object)
        for idx in np.ndindex(s.registers.shape):
            jt = idx[1]
            col = arith.addi(utils.c(8 * jt, i32), arith.muli(arith.remui(lane, utils.c(4, i32)), utils.c(2, i32)))
            z = vector.load(s.registers[idx].type, zq_ref, [_idx(col)])
            regs[idx] = arith.addf(s.registers[idx], z)
        return mgpu.FragmentedArray(_registers=regs, _layout=s.layout, _is_signed=None)

    return fn
