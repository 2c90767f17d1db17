"""Host-side (numpy) attention masks -> block-sparse metadata, in the spirit of splash attention.

A mask is the AND of three parts:
  * `MaskSpec.causal`:   key position <= query position,
  * `MaskSpec.window`:   query position - key position < window (local / sliding window),
  * an optional block mask (bool [nqb, nkb] or per query head [Nq, nqb, nkb]) at a block
    granularity `MaskSpec.mask_block` = (rows, cols) that must be a multiple of the kernel's.
Query row i sits at absolute position `i + q_offset` and key j at position j, so a chunk of
queries that continues a cached prefix uses `q_offset = prefix length`.

`build_block_metadata` turns this into, per query block, the ordered list of key blocks that
hold at least one visible element (`indices`, padded by repeating the last one), how many
there are (`counts`), and whether each needs element masking (`partial`; fully visible
blocks skip the mask). Kernels iterate over the list only, so masked-out blocks cost nothing.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np


@dataclasses.dataclass(frozen=True, slots=True)
class MaskSpec:
    """Static (hashable) part of a mask; see the module docstring."""

    causal: bool = False
    window: int | None = None
    q_offset: int = 0
    mask_block: tuple[int, int] | None = None

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window} must be >= 1 (or None)")
        if self.q_offset < 0:
            raise ValueError(f"q_offset={self.q_offset} must be >= 0")


class BlockMetadata(NamedTuple):
    """counts [Hm, nqb] int32; indices, partial [Hm, nqb, max_blocks] int32 (Hm = 1 or Nq);
    num_kv_blocks: key blocks in the full grid."""

    counts: np.ndarray
    indices: np.ndarray
    partial: np.ndarray
    num_kv_blocks: int

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs the kernel visits."""
        return float(self.counts.sum()) / (self.counts.size * self.num_kv_blocks)


def element_mask(spec: MaskSpec, q_len: int, kv_len: int, block_mask: np.ndarray | None = None) -> np.ndarray:
    """Dense visibility, bool [Hm, q_len, kv_len] (Hm = 1 without a per-head block mask)."""
    qp = np.arange(q_len)[:, None] + spec.q_offset
    kp = np.arange(kv_len)[None, :]
    m = np.ones((q_len, kv_len), bool)
    if spec.causal:
        m &= kp <= qp
    if spec.window is not None:
        m &= (qp - kp) < spec.window
    m = m[None]
    if block_mask is not None:
        bm = check_block_mask(spec, block_mask, q_len, kv_len)
        rq, rk = spec.mask_block
        m = m & np.repeat(np.repeat(bm, rq, axis=1), rk, axis=2)
    return m


def check_block_mask(spec: MaskSpec, block_mask, q_len: int, kv_len: int) -> np.ndarray:
    bm = np.asarray(block_mask, bool)
    if bm.ndim == 2:
        bm = bm[None]
    if bm.ndim != 3:
        raise ValueError(f"block_mask shape {np.shape(block_mask)} must be [nqb, nkb] or [Nq, nqb, nkb]")
    if spec.mask_block is None:
        raise ValueError("a block_mask needs MaskSpec.mask_block=(rows, cols), the block size it is given in")
    rq, rk = spec.mask_block
    if bm.shape[1] * rq != q_len or bm.shape[2] * rk != kv_len:
        raise ValueError(
            f"block_mask shape {bm.shape[1:]} with mask_block={spec.mask_block} covers "
            f"{(bm.shape[1] * rq, bm.shape[2] * rk)}, expected (q_len, kv_len)={(q_len, kv_len)}"
        )
    return bm


def build_block_metadata(
    spec: MaskSpec,
    q_len: int,
    kv_len: int,
    block_q: int,
    block_kv: int,
    block_mask: np.ndarray | None = None,
) -> BlockMetadata:
    """Block lists for a (q_len, kv_len) attention tiled by (block_q, block_kv); numpy only."""
    if q_len % block_q:
        raise ValueError(f"q_len={q_len} must be a multiple of block_q={block_q}")
    if kv_len % block_kv:
        raise ValueError(f"kv_len={kv_len} must be a multiple of block_kv={block_kv}")
    nqb, nkb = q_len // block_q, kv_len // block_kv
    # Structural part (causal / window), evaluated per block from its corners.
    q0 = np.arange(nqb)[:, None] * block_q + spec.q_offset  # first query position of the block
    q1 = q0 + block_q - 1
    k0 = np.arange(nkb)[None, :] * block_kv
    k1 = k0 + block_kv - 1
    any_vis = np.ones((nqb, nkb), bool)
    all_vis = np.ones((nqb, nkb), bool)
    if spec.causal:
        any_vis &= k0 <= q1
        all_vis &= k1 <= q0
    if spec.window is not None:
        any_vis &= (q0 - k1) < spec.window
        all_vis &= (q1 - k0) < spec.window
    any_vis, all_vis = any_vis[None], all_vis[None]
    if block_mask is not None:
        bm = check_block_mask(spec, block_mask, q_len, kv_len)
        rq, rk = spec.mask_block
        if rq % block_q or rk % block_kv:
            raise ValueError(
                f"mask_block={spec.mask_block} must be a multiple of the kernel blocks (block_q, block_kv)={(block_q, block_kv)}"
            )
        bm = np.repeat(np.repeat(bm, rq // block_q, axis=1), rk // block_kv, axis=2)
        any_vis = any_vis & bm
        all_vis = all_vis & bm
    counts = any_vis.sum(-1).astype(np.int32)
    max_blocks = max(int(counts.max()), 1)
    hm = any_vis.shape[0]
    indices = np.zeros((hm, nqb, max_blocks), np.int32)
    partial = np.zeros((hm, nqb, max_blocks), np.int32)
    for h in range(hm):
        for i in range(nqb):
            (cols,) = np.nonzero(any_vis[h, i])
            c = len(cols)
            if c:
                indices[h, i, :c] = cols
                indices[h, i, c:] = cols[-1]  # repeat: a pipelined kernel re-uses the fetched block
                partial[h, i, :c] = ~all_vis[h, i, cols]
    return BlockMetadata(counts, indices, partial, nkb)
