"""Folding the key scales into the query, for the Hopper KIVI decode kernel
(`quantized_decode_attention_mgpu.py`, `fold_scales`): q . (s * code + z) = (q * s) . code + q . z,
so once per key group the threads write B = bf16(q * s) / f into shared memory for `wgmma` and
zq = q . z - 128 sum(B) in float32, and the keys enter the product as `lop3`'s 128 + f * code.
Register-level code in Mosaic GPU's FragmentedArray API inside `plgpu.inline_mgpu`, like
`_kivi_mgpu_registers.py`.
"""

from __future__ import annotations

import numpy as np

from ._kivi_mgpu_registers import _asm, _idx, _mgpu, _thread_coords, code_position
from .kivi_fragments import TILE


def _swizzled(row, col):
    """(tile row, tile col, row, col) indices of element (row, col) of a [rows, width] bf16 array
    stored with TilingTransform((8, 64)) + SwizzleTransform(128): 16-byte chunks of each 128-byte
    row XOR-ed with the row index mod 8 (the layout `wgmma` reads B from)."""
    _, arith, _, _, _, _, _, utils = _mgpu()
    i32 = row.type
    chunk = arith.xori(
        arith.divui(arith.remui(col, utils.c(64, i32)), utils.c(8, i32)), arith.remui(row, utils.c(8, i32))
    )
    return [
        _idx(arith.divui(row, utils.c(8, i32))),
        _idx(arith.divui(col, utils.c(64, i32))),
        _idx(arith.remui(row, utils.c(8, i32))),
        _idx(arith.muli(chunk, utils.c(8, i32))),
    ]


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
                off = arith.andi(
                    arith.shrui(utils.c(table, i32), arith.muli(arith.remui(kc, utils.c(r, i32)), utils.c(3, i32))),
                    utils.c(7, i32),
                )
                hi = arith.subi(utils.c(0x3F80, i32), arith.shli(off, utils.c(7, i32)))
                inv2 = arith.ori(hi, arith.shli(hi, utils.c(16, i32)))
            at = _swizzled(row, arith.muli(kc, utils.c(8, i32)))
            qv = vector.load(v8, q_ref, at)
            out, zsum = [], None
            # K positions 8 kc + 2 qq + e hold channels 32 (kc // 4) + 8 qq + 2 (kc % 4) + e (`key_channel`)
            ch0 = arith.addi(
                arith.muli(arith.divui(kc, utils.c(4, i32)), utils.c(32, i32)),
                arith.muli(arith.remui(kc, utils.c(4, i32)), utils.c(2, i32)),
            )
            for qq in range(4):
                ch = _idx(arith.addi(ch0, utils.c(8 * qq, i32)))
                s2 = utils.bitcast(vector.load(v2, sz_ref, [_idx(g), _idx(utils.c(0, i32)), ch]), i32)
                z2 = vector.load(v2, sz_ref, [_idx(g), _idx(utils.c(1, i32)), ch])
                q2 = vector.extract_strided_slice(v2, qv, [2 * qq], [2], [1])
                if inv2 is not None:  # s / f: exact (a power of 2)
                    s2 = _asm(i32, [s2, inv2], "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r")
                b2 = _asm(i32, [utils.bitcast(q2, i32), s2], "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r")
                out.append(b2)
                bv = utils.bitcast(b2, v2)
                for e in range(2):
                    prod = arith.mulf(
                        arith.extf(f32, vector.extract(q2, [], [e])), arith.extf(f32, vector.extract(z2, [], [e]))
                    )
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
            col = arith.addi(
                arith.remui(arith.muli(gw, utils.c(rows_p, i32)), utils.c(8, i32)),
                arith.remui(arith.muli(q, utils.c(2, i32)), utils.c(rows_p, i32)),
            )
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
        ir, arith, _, _, vector, mgpu, _fa, utils = _mgpu()
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


def can_fold_scales(gk: int, h: int, t: int, gq: int, bits: int = 2) -> bool:
    """Whether the kernel can fold the key scales into the query (`fold_query_fn`): H is 128 or
    256 (16 or 32 query chunks a row, summed within a warp; the query columns, a multiple of 8
    (`fold_columns`), then split evenly over the 128 threads) and the codes are 2- or 4-bit (the
    build is written for bf16 operands; 8-bit codes use f16). gk, t and gq are accepted for the
    callers' sake: every key group and query shape folds."""
    del gk, t, gq
    return h in (128, 256) and bits in (2, 4)


def folds_by_default(gk: int, h: int, t: int, gq: int, bits: int = 2) -> bool:
    """Where `fold_scales=None` folds: where it can and a key group spans whole tiles (Gk >= 64).
    With several groups a tile the builds take the kernel to 138 registers and 62.5 KB of shared
    memory, 3 CTAs per SM instead of 4 (H200, KIVI-2 at 128k and Gk = 32: 0.42-0.43 ms folded,
    0.38 ms not; BENCHMARKS.md)."""
    return gk >= TILE and can_fold_scales(gk, h, t, gq, bits)
