"""Folding the key scales into the query, for the Hopper KIVI decode kernel (`kernel.py`, where
`folds_scales`): q . (s * code + z) = (q * s) . code + q . z, so once per key group the threads
write B = bf16(q * s) / f into shared memory for `wgmma` and zq = q . z - 128 sum(B) in float32,
and the keys enter the product as `lop3`'s 128 + f * code. Register-level code in Mosaic GPU's
FragmentedArray API inside `plgpu.inline_mgpu`, like `registers.py`.
"""

from __future__ import annotations

import numpy as np

from .fragments import TILE
from .registers import as_index, asm, code_position, mlir_modules, thread_coords


def _swizzled(row, col):
    """(tile row, tile col, row, col) indices of element (row, col) of a [rows, width] bf16 array
    stored with TilingTransform((8, 64)) + SwizzleTransform(128): 16-byte chunks of each 128-byte
    row XOR-ed with the row index mod 8 (the layout `wgmma` reads B from)."""
    _, arith, _, _, _, _, _, utils = mlir_modules()
    i32 = row.type
    chunk = arith.xori(
        arith.divui(arith.remui(col, utils.c(64, i32)), utils.c(8, i32)), arith.remui(row, utils.c(8, i32))
    )
    return [
        as_index(arith.divui(row, utils.c(8, i32))),
        as_index(arith.divui(col, utils.c(64, i32))),
        as_index(arith.remui(row, utils.c(8, i32))),
        as_index(arith.muli(chunk, utils.c(8, i32))),
    ]


def key_offsets(bits: int, h: int) -> list[int]:
    """log2 of the factor f that `unpack_fn` leaves on the key codes of each wgmma column tile
    (H/8 tiles): tile j is read from word position j % R (`register_of`), so f = 2^offset of
    `code_position(bits, j % R)`."""
    r = 16 // bits
    if (h // 8) % r:
        raise ValueError(f"H/8 = {h // 8} column tiles must be a multiple of {r} codes a word")
    return [code_position(bits, j % r)[1] for j in range(h // 8)]


def fold_query_fn(ns, h, t, gk, k_rows_per_step, bits):
    """inline_mgpu body: (q ref [NS, H], k_sz ref [groups, 2, H], bk ref [NS, H] (both swizzled
    as `_swizzled`), zq ref [NS] f32) -> nothing. For the key group of tile `t` (Gk >= 64), writes
    bk[j, k] = bf16(q[j, k] * s[channel(k)]) / f(k) (the key scales folded into the query, and
    the factor `unpack_fn` leaves on the codes of column tile k // 8 divided out: keys enter the
    product as 128 + f * code straight from `lop3`) and zq[j] = sum_k q[j, k] * z[channel(k)] -
    128 * bk[j, k] (float32: the zero points' part of the scores and the codes' offset),
    channel(k) = `fragments.key_channel`. Each thread handles 16-byte chunks of 8 K
    positions (one column tile); the 16 or 32 threads of a row sum zq by shuffles. The caller
    commits (fence + barrier) before `wgmma` reads bk."""
    chunks_row = h // 8
    per_thread = ns * h // 8 // 128
    lanes = min(32, chunks_row)
    offsets = key_offsets(bits, h)
    r = 16 // bits
    table = sum(off << (3 * j) for j, off in enumerate(offsets[:r]))  # offset of column tile j, 3 bits each

    def fn(ctx, q_ref, sz_ref, bk_ref, zq_ref):
        ir, arith, _, _, vector, _, _, utils = mlir_modules()
        from jax._src.lib.mlir.dialects import memref

        i32 = ir.IntegerType.get_signless(32)
        f32 = ir.F32Type.get()
        bf16 = ir.BF16Type.get()
        v2 = ir.VectorType.get((2,), bf16)
        v8 = ir.VectorType.get((8,), bf16)
        minus128 = arith.constant(f32, ir.FloatAttr.get(f32, -128.0))
        tid, _, lane = thread_coords()
        g = utils.c((t * TILE) // gk % k_rows_per_step, i32)  # the tile's key group: a row of the step's block
        for k in range(per_thread):
            c = arith.addi(tid, utils.c(128 * k, i32))
            row, kc = arith.divui(c, utils.c(chunks_row, i32)), arith.remui(c, utils.c(chunks_row, i32))
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
                ch = as_index(arith.addi(ch0, utils.c(8 * qq, i32)))
                s2 = utils.bitcast(vector.load(v2, sz_ref, [as_index(g), as_index(utils.c(0, i32)), ch]), i32)
                z2 = vector.load(v2, sz_ref, [as_index(g), as_index(utils.c(1, i32)), ch])
                q2 = vector.extract_strided_slice(v2, qv, [2 * qq], [2], [1])
                if inv2 is not None:  # s / f: exact (a power of 2)
                    s2 = asm(i32, [s2, inv2], "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r")
                b2 = asm(i32, [utils.bitcast(q2, i32), s2], "mul.rn.bf16x2 $0, $1, $2;", "=r,r,r")
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
                memref.store(zsum, zq_ref, [as_index(row)])

    return fn


def add_columns_fn(ns):
    """inline_mgpu body: (s [64, NS] f32 WGMMA layout, zq ref [NS] f32) -> s + zq[column]."""

    def fn(ctx, s, zq_ref):
        ir, arith, _, _, vector, mgpu, _fa, utils = mlir_modules()
        i32 = ir.IntegerType.get_signless(32)
        _, _, lane = thread_coords()
        regs = np.empty(s.registers.shape, dtype=object)
        for idx in np.ndindex(s.registers.shape):
            jt = idx[1]
            col = arith.addi(utils.c(8 * jt, i32), arith.muli(arith.remui(lane, utils.c(4, i32)), utils.c(2, i32)))
            z = vector.load(s.registers[idx].type, zq_ref, [as_index(col)])
            regs[idx] = arith.addf(s.registers[idx], z)
        return mgpu.FragmentedArray(_registers=regs, _layout=s.layout, _is_signed=None)

    return fn


def folds_scales(gk: int, h: int, bits: int) -> bool:
    """Whether the kernel folds the key scales into the query (`fold_query_fn`): where a key group
    spans whole 64-token tiles (Gk >= 64, so a tile's keys share one scale row and the fold is
    built at most once a tile), H is 128 or 256 (16 or 32 query chunks a row, summed within a
    warp; the query columns, a multiple of 8, then split evenly over the 128 threads) and the codes
    are 2- or 4-bit (the build is written for bf16 operands; 8-bit codes use f16)."""
    return gk >= TILE and h in (128, 256) and bits in (2, 4)
