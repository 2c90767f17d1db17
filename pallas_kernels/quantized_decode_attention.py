"""Decode attention over a KIVI-quantized KV cache (Liu et al. 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750).

One or a few query tokens (T; speculative verification) attend to
  * a packed 2/4/8-bit cache (layout shared with the quantization policy):
      k_codes uint32 [B, N, S/pw, H]   keys packed along tokens (pw = 32 // bits codes a word)
      k_scale, k_zero [B, N, S/Gk, H]  per channel, per group of Gk tokens
      v_codes uint32 [B, N, S, H/pw]   values packed along channels
      v_scale, v_zero [B, N, S, H/Gv]  per token, per group of Gv channels
      dequantized = code * scale + zero; `lengths` [B] or [B, N] valid tokens (a prefix)
  * plus a full-precision residual window k_res/v_res [B, N, R, H] with `res_lengths` valid
    slots; query t of T sees residual slots r < res_len - (T - 1 - t) (the new tokens sit at
    the end of the window, causally), and every valid quantized token.
GQA: q [B, T, Nq, H] with Nq = N * Gq; each program handles the T * Gq query rows of one KV
head. Split-K: the quantized tokens are cut into `num_splits` chunks (plus one program for the
residual) whose partial results are merged through their LSEs. Codes are unpacked and
dequantized in registers; the cache is read once. Returns (out [B,T,Nq,H], lse [B,T,Nq] f32).

Backends (`backend=`, `_compat` has the vocabulary): "triton" (every CUDA GPU; "mosaic_gpu" runs
it too on this layout, and `interpret=True` runs it on CPU), "mosaic_tpu" (a grid over blocks of
quantized tokens plus a residual step, one online softmax in VMEM:
`quantized_decode_attention_tpu.py`; of `block_sizes` only block_s and dequant_f32 apply, None
picks the largest block that fits; `interpret=True` runs it in the TPU interpreter) and
"reference" (the jnp reference), each an entry of one dispatch table (`_BACKENDS`). The Triton
kernel unpacks and dequantizes every code on the CUDA cores. The Hopper kernel, `kivi_mgpu`,
reads the same codes in a fragment layout of its own (`kivi_mgpu.to_fragment_layout`) that
feeds the tensor cores from registers; KIVI caches on Hopper store that layout directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat, packing
from ._compat import pl
from ._decode_common import (
    FLOAT_DTYPES,
    KERNEL_BITS,
    DecodeBlockSizes,
    check_quantized_inputs,
    finish,
    group_rows,
    init_carry,
    masked_softmax,
    merge_splits,
    online_update,
    per_head,
    u32_to_f32,
    ungroup_rows,
)
from .quantized_decode_attention_tpu import quantized_decode_attention_tpu

__all__ = [
    "FLOAT_DTYPES",
    "KERNEL_BITS",
    "DecodeBlockSizes",
    "compressed_bytes",
    "dequantize_keys",
    "dequantize_values",
    "quantized_decode_attention",
    "quantized_decode_attention_reference",
]


# ----------------------------------------------------------------------------- reference


def dequantize_keys(k_codes, k_scale, k_zero, bits):
    """[B,N,S/pw,H] codes -> float32 keys [B,N,S,H] (scales repeat over groups of tokens)."""
    codes = packing.unpack(k_codes, bits, axis=2).astype(jnp.float32)
    gk = codes.shape[2] // k_scale.shape[2]
    return codes * jnp.repeat(k_scale.astype(jnp.float32), gk, axis=2) + jnp.repeat(
        k_zero.astype(jnp.float32), gk, axis=2
    )


def dequantize_values(v_codes, v_scale, v_zero, bits):
    """[B,N,S,H/pw] codes -> float32 values [B,N,S,H] (scales repeat over groups of channels)."""
    codes = packing.unpack(v_codes, bits, axis=3).astype(jnp.float32)
    gv = codes.shape[3] // v_scale.shape[3]
    return codes * jnp.repeat(v_scale.astype(jnp.float32), gv, axis=3) + jnp.repeat(
        v_zero.astype(jnp.float32), gv, axis=3
    )


def quantized_decode_attention_reference(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    lengths,
    *,
    bits,
    k_res=None,
    v_res=None,
    res_lengths=None,
    scale=None,
):
    """Dequantize everything and attend in float32 (same semantics as the kernel)."""
    b, t, nq, h, n, s, _, _ = check_quantized_inputs(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res
    )
    g = nq // n
    scale = h**-0.5 if scale is None else scale
    lengths = per_head(lengths, b, n, "lengths")
    k = dequantize_keys(k_codes, k_scale, k_zero, bits)
    v = dequantize_values(v_codes, v_scale, v_zero, bits)
    vis = jnp.broadcast_to((jnp.arange(s)[None, None, :] < lengths[..., None])[:, :, None, :], (b, n, t, s))
    if k_res is not None:
        r = k_res.shape[2]
        res_lengths = per_head(res_lengths, b, n, "res_lengths")
        k = jnp.concatenate([k, k_res.astype(jnp.float32)], axis=2)
        v = jnp.concatenate([v, v_res.astype(jnp.float32)], axis=2)
        limit = res_lengths[:, :, None] - (t - 1 - jnp.arange(t))[None, None, :]  # [B,N,T]
        vis_r = jnp.arange(r)[None, None, None, :] < limit[..., None]
        vis = jnp.concatenate([vis, vis_r], axis=3)
    qg = q.astype(jnp.float32).reshape(b, t, n, g, h)
    logits = jnp.einsum("btngh,bnsh->bngts", qg, k, precision="highest") * scale
    logits = jnp.where(vis[:, :, None], logits, -jnp.inf)
    p, lse = masked_softmax(logits)
    out = jnp.einsum("bngts,bnsh->btngh", p, v, precision="highest")
    return out.reshape(b, t, nq, h).astype(q.dtype), jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, nq)


# ----------------------------------------------------------------------------- kernel


def _expand_rows(x, rep):
    """[r, c] -> [r * rep, c] (each row repeated)."""
    if rep == 1:
        return x
    r, c = x.shape
    return jnp.broadcast_to(x[:, None, :], (r, rep, c)).reshape(r * rep, c)


def _expand_cols(x, rep):
    """[r, c] -> [r, c * rep] (each column repeated)."""
    if rep == 1:
        return x
    r, c = x.shape
    return jnp.broadcast_to(x[:, :, None], (r, c, rep)).reshape(r, c * rep)


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
    kr_ref,
    vr_ref,
    o_ref,
    lse_ref,
    *,
    bits,
    scale,
    bs,
    chunk,
    gk,
    gv,
    gq,
    t,
    num_splits,
    has_res,
    compute_dtype,
):
    bi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pw = 32 // bits
    q = q_ref[...].astype(compute_dtype)  # [rows, H]
    rows, h = q.shape
    init = init_carry(rows, h)
    mask_code = jnp.uint32((1 << bits) - 1)

    @pl.when(si < num_splits)
    def _quantized():
        length = len_ref[bi, ni]
        start = si * chunk
        nblocks = jnp.clip(pl.cdiv(length - start, bs), 0, chunk // bs)
        k_shifts = (lax.broadcasted_iota(jnp.int32, (1, pw, 1), 1) * bits).astype(jnp.uint32)
        v_shifts = (lax.broadcasted_iota(jnp.int32, (1, 1, pw), 2) * bits).astype(jnp.uint32)

        def body(j, carry):
            s0 = start + j * bs
            kw = kc_ref[pl.ds(pl.multiple_of(s0 // pw, bs // pw), bs // pw), :]  # [bs/pw, H]
            ng = max(bs // gk, 1)
            ks = ks_ref[pl.ds(s0 // gk, ng), :].astype(jnp.float32)  # [groups in block, H]
            kz = kz_ref[pl.ds(s0 // gk, ng), :].astype(jnp.float32)
            kcodes = ((kw[:, None, :] >> k_shifts) & mask_code).reshape(bs, h)  # token-major rows
            if bs >= gk:
                ks, kz = _expand_rows(ks, gk), _expand_rows(kz, gk)
            k = (u32_to_f32(kcodes) * ks + kz).astype(compute_dtype)
            sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            kpos = s0 + lax.broadcasted_iota(jnp.int32, (rows, bs), 1)
            sc = jnp.where(kpos < length, sc, -jnp.inf)
            vw = vc_ref[pl.ds(s0, bs), :]  # [bs, H/pw]
            vs = vs_ref[pl.ds(s0, bs), :].astype(jnp.float32)  # [bs, H/gv]
            vz = vz_ref[pl.ds(s0, bs), :].astype(jnp.float32)
            vcodes = ((vw[:, :, None] >> v_shifts) & mask_code).reshape(bs, h)
            v = (u32_to_f32(vcodes) * _expand_cols(vs, gv) + _expand_cols(vz, gv)).astype(compute_dtype)
            return online_update(carry, sc, v)

        finish(lax.fori_loop(0, nblocks, body, init), o_ref, lse_ref)

    if has_res:

        @pl.when(si == num_splits)
        def _residual():
            k = kr_ref[...].astype(compute_dtype)
            v = vr_ref[...].astype(compute_dtype)
            r = k.shape[0]
            sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            row_t = lax.broadcasted_iota(jnp.int32, (rows, r), 0) // gq  # query token of each row
            limit = rlen_ref[bi, ni] - (t - 1 - row_t)
            sc = jnp.where(lax.broadcasted_iota(jnp.int32, (rows, r), 1) < limit, sc, -jnp.inf)
            finish(online_update(init, sc, v), o_ref, lse_ref)


def _auto_splits(b, n, s, bs) -> int:
    want = max(1, (132 * 16) // max(b * n, 1))  # ~16 small programs per SM on a 132-SM part
    splits = 1
    while splits * 2 <= want and s % (splits * 2 * bs) == 0:
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("bits", "scale", "bsz", "interpret"))
def _quantized_decode_jit(
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
    bsz: DecodeBlockSizes,
    interpret,
):
    b, t, nq, h = q.shape
    n = k_codes.shape[1]
    pw = 32 // bits
    s = k_codes.shape[2] * pw
    gq = nq // n
    gk, gv = s // k_scale.shape[2], h // v_scale.shape[3]
    bs = bsz.block_s
    splits = bsz.num_splits or _auto_splits(b, n, s, bs)
    chunk = s // splits
    qr, rows = group_rows(q, n)
    rows_p = qr.shape[2]
    has_res = k_res is not None
    if not has_res:  # tiny dummies keep one kernel signature
        k_res = v_res = jnp.zeros((b, n, 16, h), q.dtype)
        res_lengths = jnp.zeros((b, n), jnp.int32)
    r = k_res.shape[2]
    num_prog = splits + (1 if has_res else 0)
    compute_dtype = jnp.float32 if (q.dtype == jnp.float32 or bsz.dequant_f32) else q.dtype
    kernel = functools.partial(
        _kernel,
        bits=bits,
        scale=scale,
        bs=bs,
        chunk=chunk,
        gk=gk,
        gv=gv,
        gq=gq,
        t=t,
        num_splits=splits,
        has_res=has_res,
        compute_dtype=compute_dtype,
    )
    per_bn = lambda *shape: pl.BlockSpec((None, None, *shape), lambda bi, ni, si: (bi, ni) + (0,) * len(shape))
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, n, num_prog),
        in_specs=[
            full(lengths),
            full(res_lengths),
            per_bn(rows_p, h),
            per_bn(s // pw, h),
            per_bn(s // gk, h),
            per_bn(s // gk, h),
            per_bn(s, h // pw),
            per_bn(s, h // gv),
            per_bn(s, h // gv),
            per_bn(r, h),
            per_bn(r, h),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows_p, h), lambda bi, ni, si: (bi, ni, si, 0, 0)),
            pl.BlockSpec((None, None, None, rows_p), lambda bi, ni, si: (bi, ni, si, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, n, num_prog, rows_p, h), jnp.float32),
            jax.ShapeDtypeStruct((b, n, num_prog, rows_p), jnp.float32),
        ],
        compiler_params=None if interpret else _compat.triton_params(bsz.num_warps, bsz.num_stages),
        interpret=interpret,
        name=f"kivi{bits}_decode_attention",
    )(lengths, res_lengths, qr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res)
    out, lse = ungroup_rows(*merge_splits(o, lse), t, rows)
    return out.astype(q.dtype), lse


def _reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, *, block_sizes, interpret, **kw):
    del block_sizes, interpret  # the jnp reference has no tuning knobs
    return quantized_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, **kw)


def _triton(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    lengths,
    *,
    bits,
    k_res,
    v_res,
    res_lengths,
    scale,
    block_sizes,
    interpret,
):
    """The Triton kernel (module doc): checks its shape constraints, then runs it."""
    b, _t, _nq, h, n, s, gk, gv = check_quantized_inputs(
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res
    )
    bsz = block_sizes or DecodeBlockSizes.get_default("triton")
    bs, pw = bsz.block_s, 32 // bits
    if s % bs or bs % pw or (bs % gk and gk % bs):
        raise ValueError(
            f"S={s} must be a multiple of block_s={bs}, which must be a multiple of {pw} (bits={bits}) "
            f"and divide or be divided by the key group Gk={gk}"
        )
    splits = bsz.num_splits
    if splits is not None and s % (splits * bs):
        raise ValueError(f"S={s} must be a multiple of num_splits * block_s = {splits} * {bs}")
    for name, val in (("head_dim", h), ("block_s", bs), ("H/Gv", h // gv), ("H/pw", h // pw)):
        if val & (val - 1):
            raise ValueError(f"{name}={val} must be a power of two for the triton backend")
    if k_res is not None and (k_res.shape[2] < 16 or k_res.shape[2] & (k_res.shape[2] - 1)):
        raise ValueError(f"residual window R={k_res.shape[2]} must be a power of two >= 16")
    if k_res is not None and res_lengths is None:
        raise ValueError("res_lengths is required with a residual window")
    lengths = jnp.minimum(per_head(lengths, b, n, "lengths"), s)
    if res_lengths is not None:
        res_lengths = jnp.minimum(per_head(res_lengths, b, n, "res_lengths"), k_res.shape[2])
    scale = float(h**-0.5 if scale is None else scale)
    return _quantized_decode_jit(
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
        bsz=bsz,
        interpret=interpret,
    )


# backend -> implementation; "mosaic_gpu" runs the Triton kernel on this layout (the Hopper kernel
# reads the fragment layout: `kivi_mgpu`)
_BACKENDS = {
    "triton": _triton,
    "mosaic_gpu": _triton,
    "mosaic_tpu": quantized_decode_attention_tpu,
    "reference": _reference,
}


def quantized_decode_attention(
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
    backend: str | None = None,
    interpret: bool = False,
):
    """KIVI decode attention (see module docstring). lengths / res_lengths: [B] or [B, N];
    backend: one of `_compat.KERNEL_BACKENDS` or None (by device). Returns (out [B, T, Nq, H] in
    q.dtype, lse [B, T, Nq] float32)."""
    check_quantized_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res)
    backend = _compat.resolve_backend(backend, interpret, tuple(_BACKENDS))
    return _BACKENDS[backend](
        q,
        k_codes,
        k_scale,
        k_zero,
        v_codes,
        v_scale,
        v_zero,
        lengths,
        bits=bits,
        k_res=k_res,
        v_res=v_res,
        res_lengths=res_lengths,
        scale=scale,
        block_sizes=block_sizes,
        interpret=interpret,
    )


def compressed_bytes(b, n, s, h, bits, gk, gv, scale_bytes=2, r=0, res_bytes=2) -> int:
    """Bytes the kernel must read for one decode step (codes + scales/zeros + residual)."""
    codes = 2 * b * n * s * h * bits // 8
    scales = 2 * b * n * (s // gk) * h * scale_bytes + 2 * b * n * s * (h // gv) * scale_bytes
    return codes + scales + 2 * b * n * r * h * res_bytes
