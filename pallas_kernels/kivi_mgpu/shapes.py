"""Shapes and defaults of the Hopper KIVI decode kernel (`kernel.py`): the input checks, the
query rows and columns the kernel computes, its tuning knobs (`KiviMgpuBlockSizes`) and their
defaults: how many split-K programs it runs, pipeline steps and stages (Liu et al. 2024, KIVI,
https://arxiv.org/abs/2402.02750)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from .._compat import plgpu
from .fragments import MGPU_BITS, TILE, KiviFragments, key_channel, operand_dtype

# Default bound on a split's length. The value product accumulates A = 128 + f * code, whose offset
# the column sums take out after the loop: the float32 accumulator holds more than the result, so
# its rounding error grows with the split's length (`registers.value_code_position` keeps f >= 4).
SPLIT_TOKENS = 16384


@dataclasses.dataclass(frozen=True, slots=True)
class KiviMgpuBlockSizes:
    """Tuning knobs of the Hopper KIVI decode kernel (static; None: the default for the shape).

    num_splits: split-K programs per (row, KV head) (`default_splits`: one wave of 4 CTAs per SM
    on an H100/H200, splits of at most SPLIT_TOKENS tokens; fewer, longer splits cost the merge
    less and lose a little precision); stages: pipeline depth (`default_stages`); tiles_per_step:
    64-token tiles per pipeline step, 1, 2 or 4 (`default_tiles_per_step`)."""

    num_splits: int | None = None
    stages: int | None = None
    tiles_per_step: int | None = None

    @classmethod
    def get_default(cls) -> KiviMgpuBlockSizes:
        return cls()

    def resolved(self, *, b: int, n: int, s: int, h: int, gk: int, bits: int, fold: bool) -> KiviMgpuBlockSizes:
        """Every None replaced by its default for these shapes; raises ValueError naming a value
        that does not fit."""
        tps = default_tiles_per_step(bits, s, gk, fold) if self.tiles_per_step is None else self.tiles_per_step
        if tps not in (1, 2, 4) or (gk < tps * TILE and (tps * TILE) % gk):
            raise ValueError(
                f"tiles_per_step={tps} must be 1, 2 or 4 (and a step's {tps * TILE} tokens a multiple of "
                f"the key group Gk={gk} when they hold several groups)"
            )
        stages = default_stages(bits, h, tps) if self.stages is None else self.stages
        if stages < 1:
            raise ValueError(f"stages={stages} must be at least 1")
        splits = default_splits(b, n, s, tps, gk) if self.num_splits is None else self.num_splits
        tiles = s // TILE
        if not splits_fit(splits, tiles=tiles, tps=tps, gk=gk):
            raise ValueError(
                f"S/64 = {tiles} tiles must be a multiple of num_splits * tiles_per_step = {splits} * "
                f"{tps}, and each split's {tiles // max(splits, 1) * TILE} tokens a multiple of the key "
                f"group Gk={gk}"
            )
        return KiviMgpuBlockSizes(num_splits=splits, stages=stages, tiles_per_step=tps)


def splits_fit(p: int, *, tiles: int, tps: int, gk: int) -> bool:
    return p >= 1 and tiles % (p * tps) == 0 and (tiles // p * TILE) % gk == 0


def default_splits(b: int, n: int, s: int, tps: int, gk: int, sms: int = 132) -> int:
    """num_splits=None: doubled while the splits fit the tiles and either the B * N * splits CTAs
    still fit one wave of 4 per SM or a split is longer than SPLIT_TOKENS."""
    fits = functools.partial(splits_fit, tiles=s // TILE, tps=tps, gk=gk)
    p = 1
    while fits(p * 2) and (p * 2 * b * n <= sms * 4 or s // p > SPLIT_TOKENS):
        p *= 2
    return p


def default_tiles_per_step(bits: int, s: int, gk: int, fold: bool) -> int:
    """tiles_per_step=None: the most 64-token tiles a pipeline step can take, of 4 for 2-bit codes
    and 2 for 4-bit codes whose key scales are not folded (a bigger step pays its bookkeeping and
    the latency of its first loads once for more tokens), of 2 for folded 2-bit codes (4 would
    take the folded kernel past 128 registers a thread), else 1. A step's tiles must divide the
    S/64 tiles and hold whole key groups (or a part of one)."""
    prefs = (4, 2, 1) if bits == 2 and not fold else (2, 1) if bits == 2 or (bits == 4 and not fold) else (1,)
    return next(p for p in prefs if (s // TILE) % p == 0 and (gk >= p * TILE or (p * TILE) % gk == 0))


def default_stages(bits: int, h: int, tps: int) -> int:
    """stages=None: 2 where a pipeline step's codes take 16 KB or more (and for 8-bit codes), so
    the kernel keeps 4 CTAs per SM in shared memory; else 4."""
    return 2 if bits == 8 or tps * TILE * h * bits // 4 >= 16384 else 4


def score_columns(rows_q: int) -> int:
    """Columns of the key product: the query rows, repeated up to 8 (wgmma's smallest N)."""
    return rows_q if rows_q % 8 == 0 else 8


def value_columns(n_gc: int, rows_q: int) -> int:
    """Columns of the value product: one copy of the query rows per value group, repeated until
    a multiple of 16 (wgmma's B needs rows of >= 32 bytes) and of the score columns."""
    nb = n_gc * rows_q
    while nb % 16 or nb % score_columns(rows_q):
        nb *= 2
    return nb


def padded_rows(rows_q: int) -> int:
    """Query rows the kernel computes for `rows_q` real ones: 2, 4, 8 or a multiple of 8 (the
    extra rows are zero queries whose results are dropped)."""
    return next(r for r in (2, 4, 8) if rows_q <= r) if rows_q <= 8 else -(-rows_q // 8) * 8


def query_columns(q, n: int):
    """q [B, T, N*Gq, H] -> (qb [B, N, NS, H]: the T*Gq query rows of each KV head, zero-padded
    to `padded_rows`, key channels permuted (`key_channel`), repeated to NS columns
    (`score_columns`): column j is padded row j % rows_p; qr [B, N, rows, H] unpermuted and
    unpadded; rows; rows_p)."""
    b, t, nq, h = q.shape
    gq = nq // n
    rows_q = t * gq
    rows_p = padded_rows(rows_q)
    qr = q.reshape(b, t, n, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, n, rows_q, h)
    qp = jnp.pad(qr, ((0, 0), (0, 0), (0, rows_p - rows_q), (0, 0)))[..., key_channel(np.arange(h), h)]
    return jnp.tile(qp, (1, 1, score_columns(rows_p) // rows_p, 1)), qr, rows_q, rows_p


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
    if fr.words.ndim != 5 or fr.words.dtype != jnp.uint32:
        raise ValueError(f"words must be uint32 [B, N, S/64, 2, W]; got {fr.words.dtype}{fr.words.shape}")
    n, tiles = fr.words.shape[1], fr.words.shape[2]
    s = tiles * TILE
    w = TILE * h * bits // 32
    if fr.words.shape != (b, n, tiles, 2, w):
        raise ValueError(
            f"words{fr.words.shape} must be [B, N, S/64, 2, {w}] for bits={bits}, H={h} (from "
            f"q{q.shape}); build it with to_fragment_layout"
        )
    if nq % n:
        raise ValueError(f"query heads {nq=} must be a multiple of key/value heads {n=}")
    if h % 64 or h > 256:
        raise ValueError(f"head_dim H={h} must be 64, 128, 192 or 256 for the Mosaic GPU KIVI kernel")
    if fr.k_sz.ndim != 5 or fr.k_sz.shape[:2] != (b, n) or fr.k_sz.shape[3:] != (2, h) or s % fr.k_sz.shape[2]:
        raise ValueError(f"k_sz{fr.k_sz.shape} must be [B, N, S/Gk, 2, H] with B={b}, N={n}, S={s}, H={h}")
    if fr.v_sz.ndim != 6 or fr.v_sz.shape[:5] != (b, n, tiles, 2, TILE) or h % fr.v_sz.shape[5]:
        raise ValueError(f"v_sz{fr.v_sz.shape} must be [B, N, S/64, 2, 64, H/Gv] with B={b}, N={n}, S={s}, H={h}")
    for name, x in (("k_sz", fr.k_sz), ("v_sz", fr.v_sz)):
        if x.dtype != operand_dtype(bits):
            raise ValueError(
                f"{name} dtype={x.dtype} is not supported by the Mosaic GPU KIVI kernel for bits={bits}; "
                f"expected {jnp.dtype(operand_dtype(bits)).name} (`to_fragment_layout`)"
            )
    gk = s // fr.k_sz.shape[2]
    gv = h // fr.v_sz.shape[5]
    if not (gk % 16 == 0 and (TILE % gk == 0 or gk % TILE == 0)):
        raise ValueError(f"key group Gk={gk} must be 16, 32, 64 or a multiple of 64 for the Mosaic GPU KIVI kernel")
    if h % gv or gv % 2:
        raise ValueError(f"the value group Gv={gv} must be even and divide H={h} for the Mosaic GPU KIVI kernel")
    return b, t, nq, h, n, s, gk, gv
