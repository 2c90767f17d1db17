"""Mosaic TPU version of KIVI decode attention (`quantized_decode_attention.py` holds the
layout, the semantics, the Triton kernel, the jnp reference and the dispatch table that calls
this one for backend="mosaic_tpu"; this file only the TPU kernel).

q [B, T, Nq, H]; k_codes uint32 [B, N, S/pw, H] (packed along tokens), k_scale/k_zero
[B, N, S/Gk, H]; v_codes uint32 [B, N, S, H/pw] (packed along channels), v_scale/v_zero
[B, N, S, H/Gv]; lengths [B, N]; optional residual k_res/v_res [B, N, R, H] with res_lengths
[B, N]. Returns (out [B, T, Nq, H] q.dtype, lse [B, T, Nq] float32).

Grid (B, N, S/block_s [+ 1]), the last axis "arbitrary": step i attends to quantized tokens
[i * block_s, (i + 1) * block_s), the extra last step (only with a residual window) to the
residual window (query t sees slots r < res_len - (T - 1 - t)), all through one online softmax kept in VMEM scratch
(so nothing is merged afterwards). The lengths are scalar-prefetched: steps past a (row, KV
head)'s length are skipped with `pl.when`, and their BlockSpec index_map repeats the last
valid block so the pipeline issues no DMA for them.

Dequantization in VMEM (codes are `packing.pack` words: code j of a word in bits
[j*bits, (j+1)*bits); dequantized = code * scale + zero):
  * keys, packed along tokens (sublanes): slot j of the [block_s/pw, H] words holds tokens
    w*pw + j; it is shifted/masked, converted, and stored with sublane stride pw into a float32
    VMEM tile [block_s, H], which the per-token-group scales / zeros are then applied to;
  * values, packed along channels (lanes): Mosaic has no lane-strided store, so the lane
    spread is done on the MXU: each of the 4 bytes of the words [block_s, H/pw] (integers
    <= 255, exact in bfloat16) is multiplied by a 0/1 matrix [H/pw, H] that sends word c's
    byte to the channels c*pw + j it holds; the sum is every channel's byte (exact, float32
    accumulation), shifted/masked to its code. The per-(token, channel-group) scales / zeros
    [block_s, H/Gv] are spread to [block_s, H] the same way (bfloat16 in one pass, other
    dtypes as float32 at HIGHEST precision). K and V then go to the dots in q's dtype
    (float32 with `dequant_f32`), like the Triton kernel.

Shapes: block_s (default: the largest of 512, 256, ..., 8 that fits) must divide S, be a
multiple of 8 and of pw = 32 // bits, and divide or be divided by the key group Gk.
bits in {2, 4, 8}. On a real TPU head_dim should be a multiple of 128 (lane tiling); smaller
head dims run in interpret mode, which is what the CPU tests use. Checked in the TPU interpreter
(`interpret=True`) and lowered to Mosaic from CPU; not compiled for or run on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat
from ._compat import pl
from ._decode_common import (
    DecodeBlockSizes,
    check_quantized_inputs,
    group_rows,
    per_head,
    scratch_finish,
    scratch_init,
    scratch_update,
    u32_to_f32,
    ungroup_rows,
)

_BLOCK_CHOICES = (512, 256, 128, 64, 32, 16, 8)


def _fits(bs: int, s: int, pw: int, gk: int) -> bool:
    return bs % 8 == 0 and s % bs == 0 and bs % pw == 0 and (bs % gk == 0 or gk % bs == 0)


def _lane_spread(x, rep: int, width: int, dtype, precision=None):
    """x [r, c] -> [r, c * rep] with column c repeated `rep` times, as a dot with a 0/1 matrix:
    exact, every output being one input times 1 (bfloat16 in one MXU pass, float32 at HIGHEST)."""
    c = x.shape[1]
    col = lax.broadcasted_iota(jnp.int32, (c, width), 1)
    sel = (col // rep == lax.broadcasted_iota(jnp.int32, (c, width), 0)).astype(dtype)
    return lax.dot_general(
        x.astype(dtype), sel, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _values(vw, vs, vz, bits: int, h: int):
    """Words [bs, H/pw] uint32, scales / zeros [bs, H/Gv] -> float32 values [bs, H]."""
    pw, cpb = 32 // bits, 8 // bits  # codes per word, per byte
    col = lax.broadcasted_iota(jnp.int32, (vw.shape[1], h), 1)
    row = lax.broadcasted_iota(jnp.int32, (vw.shape[1], h), 0)
    byte = jnp.zeros((vw.shape[0], h), jnp.float32)
    for kb in range(4):  # byte kb of word c -> channels c*pw + j whose code sits in that byte
        sel = ((col // pw == row) & ((col % pw) // cpb == kb)).astype(jnp.bfloat16)
        b8 = u32_to_f32((vw >> jnp.uint32(8 * kb)) & jnp.uint32(0xFF)).astype(jnp.bfloat16)
        byte = byte + lax.dot_general(b8, sel, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    if bits < 8:
        shift = ((lax.broadcasted_iota(jnp.int32, byte.shape, 1) % cpb) * bits).astype(jnp.uint32)
        codes = u32_to_f32(
            (lax.bitcast_convert_type(byte.astype(jnp.int32), jnp.uint32) >> shift) & jnp.uint32((1 << bits) - 1)
        )
    else:
        codes = byte
    gv = h // vs.shape[1]
    hi = lax.Precision.HIGHEST
    scale = vs if vs.dtype == jnp.bfloat16 else vs.astype(jnp.float32)
    zero = vz if vz.dtype == jnp.bfloat16 else vz.astype(jnp.float32)
    return codes * _lane_spread(scale, gv, h, scale.dtype, None if scale.dtype == jnp.bfloat16 else hi) + _lane_spread(
        zero, gv, h, zero.dtype, None if zero.dtype == jnp.bfloat16 else hi
    )


def _kernel(
    len_ref,
    rlen_ref,
    q_ref,
    kc_ref,
    ks_ref,
    kz_ref,
    vc_ref,
    vs_ref,
    vz_ref,
    *rest,
    bits,
    scale,
    bs,
    gk,
    gq,
    t,
    n,
    nsb,
    has_res,
    compute_dtype,
):
    if has_res:
        kr_ref, vr_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr, kbuf = rest
    else:
        o_ref, lse_ref, m_scr, l_scr, acc_scr, kbuf = rest
    bi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    bn = bi * n + ni
    pw = 32 // bits
    h = acc_scr.shape[1]

    @pl.when(si == 0)
    def _init():
        scratch_init(m_scr, l_scr, acc_scr)

    length = len_ref[bn]

    @pl.when((si < nsb) & (si * bs < length))
    def _quantized():
        q = q_ref[...].astype(compute_dtype)
        kw = kc_ref[...]  # [bs/pw, H] uint32: slot j of word w = token w*pw + j
        a = bs // pw
        for j in range(pw):
            kbuf[pl.ds(j, a, stride=pw), :] = u32_to_f32((kw >> jnp.uint32(j * bits)) & jnp.uint32((1 << bits) - 1))
        ks = ks_ref[...].astype(jnp.float32)  # [max(bs/gk, 1), H]
        kz = kz_ref[...].astype(jnp.float32)
        if bs <= gk:
            k = kbuf[...] * ks + kz
        else:
            for g in range(bs // gk):
                kbuf[pl.ds(g * gk, gk), :] = kbuf[pl.ds(g * gk, gk), :] * ks[g : g + 1] + kz[g : g + 1]
            k = kbuf[...]
        s = (
            lax.dot_general(q, k.astype(compute_dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            * scale
        )
        kpos = si * bs + lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(kpos < length, s, -jnp.inf)
        v = _values(vc_ref[...], vs_ref[...], vz_ref[...], bits, h)
        scratch_update(m_scr, l_scr, acc_scr, s, v.astype(compute_dtype))

    if has_res:

        @pl.when(si == nsb)
        def _residual():
            q = q_ref[...].astype(compute_dtype)
            k = kr_ref[...].astype(compute_dtype)  # [R, H]
            s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            row_t = lax.broadcasted_iota(jnp.int32, s.shape, 0) // gq  # query token of each row
            limit = rlen_ref[bn] - (t - 1 - row_t)
            s = jnp.where(lax.broadcasted_iota(jnp.int32, s.shape, 1) < limit, s, -jnp.inf)
            scratch_update(m_scr, l_scr, acc_scr, s, vr_ref[...].astype(compute_dtype))

    @pl.when(si == nsb + (1 if has_res else 0) - 1)
    def _finish():
        scratch_finish(m_scr, l_scr, acc_scr, o_ref, lse_ref)


@functools.partial(jax.jit, static_argnames=("bits", "scale", "block_sizes", "interpret"))
def _quantized_decode_tpu_jit(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    lengths,
    k_res,
    v_res,
    res_lengths,
    *,
    bits,
    scale,
    block_sizes: DecodeBlockSizes,
    interpret,
):
    pltpu = _compat.pltpu
    b, t, nq, h = q.shape
    n = k_codes.shape[1]
    pw = 32 // bits
    s = k_codes.shape[2] * pw
    gk, gv = s // k_scale.shape[2], h // v_scale.shape[3]
    bs = block_sizes.block_s
    nsb = s // bs
    qr, rows = group_rows(q, n)
    rows_p = -(-rows // 8) * 8
    qr = qr[:, :, :rows_p]
    has_res = k_res is not None
    if not has_res:
        res_lengths = jnp.zeros((b, n), jnp.int32)
    compute_dtype = jnp.float32 if (q.dtype == jnp.float32 or block_sizes.dequant_f32) else q.dtype
    # Blocks whose last two dims are the array's full dims (any size is then legal on TPU).
    kc = k_codes.reshape(b, n, nsb, bs // pw, h)
    kgrp = max(bs // gk, 1)
    ks, kz = (x.reshape(b, n, s // (gk * kgrp), kgrp, h) for x in (k_scale, k_zero))
    kdiv = max(gk // bs, 1)  # quantized blocks per key group

    def blk(bi, ni, si, len_ref):  # the step's block, clamped to the last one holding valid tokens
        last = jnp.maximum((len_ref[bi * n + ni] + bs - 1) // bs - 1, 0)
        return jnp.minimum(si, last)

    def kc_map(bi, ni, si, len_ref, rlen_ref):
        return bi, ni, blk(bi, ni, si, len_ref), 0, 0

    def ks_map(bi, ni, si, len_ref, rlen_ref):
        return bi, ni, blk(bi, ni, si, len_ref) // kdiv, 0, 0

    def v_map(bi, ni, si, len_ref, rlen_ref):
        return bi, ni, blk(bi, ni, si, len_ref), 0

    def head_map(bi, ni, si, *_):
        return bi, ni, 0, 0

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, n, nsb + (1 if has_res else 0)),
        in_specs=[
            pl.BlockSpec((None, None, rows_p, h), head_map),
            pl.BlockSpec((None, None, None, bs // pw, h), kc_map),
            pl.BlockSpec((None, None, None, kgrp, h), ks_map),
            pl.BlockSpec((None, None, None, kgrp, h), ks_map),
            pl.BlockSpec((None, None, bs, h // pw), v_map),
            pl.BlockSpec((None, None, bs, h // gv), v_map),
            pl.BlockSpec((None, None, bs, h // gv), v_map),
            *([pl.BlockSpec((None, None, k_res.shape[2], h), head_map)] * 2 if has_res else []),
        ],
        out_specs=[
            pl.BlockSpec((None, None, rows_p, h), head_map),
            pl.BlockSpec((None, None, rows_p, 1), head_map),
        ],
        scratch_shapes=[
            pltpu.VMEM((rows_p, 1), jnp.float32),
            pltpu.VMEM((rows_p, 1), jnp.float32),
            pltpu.VMEM((rows_p, h), jnp.float32),
            pltpu.VMEM((bs, h), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _kernel,
        bits=bits,
        scale=scale,
        bs=bs,
        gk=gk,
        gq=nq // n,
        t=t,
        n=n,
        nsb=nsb,
        has_res=has_res,
        compute_dtype=compute_dtype,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, n, rows_p, h), q.dtype),
            jax.ShapeDtypeStruct((b, n, rows_p, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=_compat.tpu_interpret_params() if interpret else False,
        name=f"kivi{bits}_decode_attention_tpu",
    )(
        lengths.reshape(-1),
        res_lengths.reshape(-1),
        qr,
        kc,
        ks,
        kz,
        v_codes,
        v_scale,
        v_zero,
        *((k_res, v_res) if has_res else ()),
    )
    return ungroup_rows(out, lse[..., 0], t, rows)


def quantized_decode_attention_tpu(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    lengths,
    *,
    bits: int,
    k_res=None,
    v_res=None,
    res_lengths=None,
    scale: float | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    interpret: bool = False,
):
    """Mosaic TPU KIVI decode attention (module docstring); `interpret=True` runs it in the TPU
    interpreter. block_sizes: a `DecodeBlockSizes` (only block_s and dequant_f32 apply here)
    or None (the largest block_s that fits). Returns (out [B, T, Nq, H] q.dtype, lse [B, T, Nq]
    float32)."""
    b, _t, _nq, h, n, s, gk, _gv = check_quantized_inputs(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res
    )
    pw = 32 // bits
    if block_sizes is None:
        bs = next((c for c in _BLOCK_CHOICES if _fits(c, s, pw, gk)), None)
        if bs is None:
            raise ValueError(
                f"no block_s in {_BLOCK_CHOICES} fits S={s} (multiple of 8 and of {pw} for bits={bits}, "
                f"dividing or divided by the key group Gk={gk}) on mosaic_tpu"
            )
        block_sizes = dataclasses.replace(DecodeBlockSizes.get_default("mosaic_tpu"), block_s=bs, dequant_f32=False)
    else:
        bs = block_sizes.block_s
        if not _fits(bs, s, pw, gk):
            raise ValueError(
                f"block_s={bs} must divide S={s}, be a multiple of 8 and of {pw} (bits={bits}), and "
                f"divide or be divided by the key group Gk={gk} on mosaic_tpu"
            )
    if k_res is not None and res_lengths is None:
        raise ValueError("res_lengths is required with a residual window")
    lengths = jnp.clip(per_head(lengths, b, n, "lengths"), 0, s)
    if res_lengths is not None:
        res_lengths = per_head(res_lengths, b, n, "res_lengths")  # unclipped: the reference rule as is
    scale = float(h**-0.5 if scale is None else scale)
    return _quantized_decode_tpu_jit(
        q,
        k_codes,
        k_scale,
        k_zero,
        v_codes,
        v_scale,
        v_zero,
        lengths,
        k_res,
        v_res,
        res_lengths,
        bits=bits,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )


__all__ = ["quantized_decode_attention_tpu"]
