"""The fragment layout of the Hopper KIVI decode kernel (`kernel.py`):
KIVI codes (Liu et al. 2024, https://arxiv.org/abs/2402.02750) arranged so that each thread's
16-byte load holds exactly the registers `wgmma` reads for its A operand (Marlin-style, Frantar
et al. 2024).

`wgmma` reads A from registers in a fixed fragment layout (thread `l` of warp `w` holds rows
16w + l/4 (+8) and column pairs 8j + 2(l%4)). Per 64-token tile:
* keys: A = K [64 tokens, H], the channels permuted so that a thread's H/4 channels come in
  chunks of 8 and the four threads of a row read neighbouring 16-byte chunks of the key scales
  and zeros (`key_channel`: vector loads with no shared-memory bank conflict);
* values: A = V^T [H, 64 tokens] (rows = channels);
word m of thread t holds, at bits (b*i, 16 + b*i), the two codes of register m*R + i (R = 16/b)
(`fragment_slots`, `register_of`). `to_fragment_layout` / `from_fragment_layout` convert from / to the
standard KIVI layout that `pallas_kernels.quantized_decode_attention` reads.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import packing

TILE = 64  # tokens per pipeline step (the wgmma M of the key product)
MGPU_BITS = (2, 4, 8)


def operand_dtype(bits: int):
    """The kernel's `wgmma` operand type for `bits`-wide codes, which the fragment layout also
    stores the scales and zeros in: codes enter the tensor cores as base + f * code, exact only
    below the next power of two, bf16 (base 128, 7 mantissa bits) for 2- and 4-bit codes, f16
    (base 1024, 10 mantissa bits) for 8-bit ones (`registers.code_base`)."""
    return jnp.float16 if bits == 8 else jnp.bfloat16


class KiviFragments(NamedTuple):
    """A KIVI cache in the fragment layout of this kernel (see module doc); keys and values,
    scales and zeros sit side by side so that one pipeline step issues three copies, not six.

    words [B, N, S/64, 2, 64*H*b/32] uint32 (keys, values); k_sz [B, N, S/Gk, 2, H] (key scale,
    zero: per channel, per group of Gk tokens); v_sz [B, N, S/64, 2, 64, H/Gv] (value scale,
    zero: per token, per group of Gv channels; groups last, so the threads of a warp, 8 tokens and
    two neighbouring groups, read distinct banks); scales in `operand_dtype(b)`: bf16, f16 for
    8-bit codes.
    Every leaf has its token axis (in tiles, groups or tokens) at axis 2, so a cache appends
    whole tiles with one dynamic_update_slice per leaf."""

    words: jax.Array
    k_sz: jax.Array
    v_sz: jax.Array


@functools.cache
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
    rt, half, j = register_of(m * r + i, col_tiles)
    row = 64 * rt + 16 * warp + 8 * half + lane // 4
    col = 8 * j + 2 * (lane % 4) + e
    shape = (128, words, r, 2)
    return np.broadcast_to(row, shape).copy(), np.broadcast_to(col, shape).copy()


def register_of(flat, col_tiles: int):
    """Register `flat` = word * R + position of a thread's A fragment -> (row tile, row half,
    column tile). The column tile runs fastest, so position i of every word holds column tiles
    j = i (mod R): for 2-bit codes the kernel then extracts positions 0-2, 3-5 and 6-7 of a word
    from three shifts of it (`registers.unpack_fn`), and the power-of-4 factor this
    leaves on a code depends on its column tile alone."""
    return flat // (2 * col_tiles), (flat // col_tiles) % 2, flat % col_tiles


def key_channel(col, h: int):
    """Channel that wgmma column `col` of the key tile holds. Thread l%4 = q holds columns
    8j + 2q + e; its column tiles j = 4v + p (v < H/32, p < 4) hold the 8 channels of chunk
    4v + q: col 8(4v + p) + 2q + e -> 32v + 8q + 2p + e. A thread's scales (or zeros) are then
    H/32 loads of 16 bytes, and the four threads q of a row read four neighbouring chunks: 64
    bytes in distinct banks (with a thread's channels contiguous, q*H/4 + 2j + e, threads q and
    q + 2 would meet in the same banks: a 2-way conflict on every load)."""
    del h  # every H (a multiple of 32) permutes the same way within its 32-channel blocks
    j, q, e = col // 8, (col % 8) // 2, col % 2
    return 32 * (j // 4) + 8 * q + 2 * (j % 4) + e


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
    dt = operand_dtype(bits)
    v_sz = jnp.stack([v_scale.astype(dt), v_zero.astype(dt)], axis=3)  # [B,N,S,2,H/Gv]
    v_sz = jnp.swapaxes(v_sz.reshape(b, n, s // TILE, TILE, 2, -1), 3, 4)  # [B,N,S/64,2,64,H/Gv]
    return KiviFragments(
        jnp.stack([k_words, v_words], axis=3), jnp.stack([k_scale.astype(dt), k_zero.astype(dt)], axis=3), v_sz
    )


def from_fragment_layout(fr: KiviFragments, *, bits: int):
    """Inverse of `to_fragment_layout` for the codes: -> (key codes [B,N,S,H], value codes
    [B,N,S,H] int32, k_scale, k_zero [B,N,S/Gk,H], v_scale, v_zero [B,N,S,H/Gv] in
    `operand_dtype(bits)`)."""
    b, n, tiles, _, w = fr.words.shape
    h = w * 32 // bits // TILE
    out = []
    for kv, (m_rows, k_cols) in enumerate(((TILE, h), (h, TILE))):
        rows, cols = fragment_slots(m_rows, k_cols, bits)
        if kv == 0:
            cols = key_channel(cols, h)
        # inverse map: for each tile element, its word (thread * W + word) and bit offset
        flat_word = np.zeros((m_rows, k_cols), np.int32)
        bit = np.zeros((m_rows, k_cols), np.int32)
        t_, m_, i_, e_ = np.meshgrid(*map(np.arange, rows.shape), indexing="ij")
        flat_word[rows, cols] = t_ * rows.shape[1] + m_
        bit[rows, cols] = bits * i_ + 16 * e_
        words = fr.words[:, :, :, kv]  # [B,N,tiles,128*W]
        codes = (words[..., flat_word] >> jnp.asarray(bit, jnp.uint32)) & jnp.uint32((1 << bits) - 1)
        codes = codes.astype(jnp.int32)  # [B,N,tiles,m_rows,k_cols]
        if kv == 1:
            codes = jnp.swapaxes(codes, -1, -2)  # V^T -> [tokens, channels]
        out.append(codes.reshape(b, n, tiles * TILE, h))
    v_sz = jnp.swapaxes(fr.v_sz, 3, 4).reshape(b, n, tiles * TILE, 2, -1)
    return (out[0], out[1], fr.k_sz[:, :, :, 0], fr.k_sz[:, :, :, 1], v_sz[:, :, :, 0], v_sz[:, :, :, 1])
