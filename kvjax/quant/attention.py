"""Decode attention over a KIVI-layout quantized state, behind one dispatcher.

`kivi_decode_attention_reference` is the jnp reference (dequantize, then exact
attention over quantized tokens + the full-precision residual window, merged through
their log-sum-exps). A fused kernel (pallas_kernels/quantized_decode_attention.py) plugs
in with `register_quantized_kernel(name, fn)`; it is used only when the layer's
implementation (`ctx.implementation`, else the backend default: "pallas" on GPU/TPU,
"reference" on CPU) names it, with the same arguments and semantics as the reference, so
results never change behind the caller's back: with no kernel, or shapes a kernel cannot
take, the reference runs. "pallas" is registered here (`pallas_kivi_attention`).
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import attention
from ..pallas_kernels.kivi_mgpu import KiviFragments
from . import affine

_KERNELS: dict = {}


def register_quantized_kernel(name: str, fn) -> None:
    """fn(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, k_res, v_res,
    res_len, *, bits, group, res_pos, q_pos) -> out [B, T, Nq, H]."""
    _KERNELS[name] = fn


def registered_kernels() -> tuple:
    return tuple(sorted(_KERNELS))


def kivi_decode_attention_reference(
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
    res_len,
    *,
    bits: int,
    group: int,
    res_pos=None,
    q_pos=None,
):
    """q [B, T, Nq, H]; KIVI codes/scales (kvjax.quant.kivi layout) holding `lengths`
    [B, N] quantized tokens (all visible: they precede every decode query); residual
    k_res/v_res [B, N, R, H] with res_len [B, N] valid slots (positions res_pos [B, N, R],
    default: visible). Returns out [B, T, Nq, H] (exact softmax over both parts)."""
    b, t = q.shape[:2]
    h = q.shape[3]
    q_pos = jnp.zeros((b, t), jnp.int32) if q_pos is None else q_pos
    k = affine.dequant_channelwise(k_codes, k_scale, k_zero, bits, group)
    v = affine.dequant_tokenwise(v_codes, v_scale, v_zero, bits, group, h)
    kpos = jnp.where(jnp.arange(k.shape[2]) < lengths[..., None], 0, -1)
    r1 = attention.attention_reference(q, k.astype(q.dtype), v.astype(q.dtype), q_pos, kpos)
    valid = jnp.arange(k_res.shape[2]) < res_len[..., None]
    rpos = jnp.where(valid, 0 if res_pos is None else res_pos, -1)
    r2 = attention.attention_reference(q, k_res.astype(q.dtype), v_res.astype(q.dtype), q_pos, rpos)
    out, _ = attention.merge_partials([r1.out, r2.out], [r1.lse, r2.lse])
    return out


def fused_kivi_attention(state, q, q_pos, ctx, *, bits: int, group: int):
    """The kernel registered for the layer's implementation (ctx.implementation, else the
    backend default: 'pallas' on GPU/TPU) applied to a KIVI QuantState; None (use the
    reference) when none is registered or the kernel cannot take these shapes."""
    impl = attention.resolve_implementation(ctx.implementation, strict=False)
    d = state.streams[0].data
    if ctx.config.sliding_window is not None:
        return None
    if isinstance(d, KiviFragments):  # the Hopper kernel's layout (kvjax.quant.kivi, layout=...)
        if impl != "pallas":
            return None
        return mgpu_kivi_attention(q, d, state.streams[0].count, state.res_k, state.res_v, state.res_len, bits=bits)
    fn = _KERNELS.get(impl)
    if fn is None:
        return None
    return fn(
        q,
        d.k_codes,
        d.k_scale,
        d.k_zero,
        d.v_codes,
        d.v_scale,
        d.v_zero,
        state.streams[0].count,
        state.res_k,
        state.res_v,
        state.res_len,
        bits=bits,
        group=group,
        res_pos=state.res_pos,
        q_pos=q_pos,
    )


def pallas_kivi_attention(
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
    res_len,
    *,
    bits: int,
    group: int,
    res_pos=None,
    q_pos=None,
):
    """Adapter to pallas_kernels.quantized_decode_attention (same layout). It pads the
    residual window to the power of two the kernel wants (padding is masked by res_len)
    and returns None where the kernel does not apply (3-bit codes, or a token count that is
    not a multiple of its block), so the caller runs the reference instead."""
    from ..pallas_kernels import quantized_decode_attention as kernel

    if bits not in kernel.KERNEL_BITS or q.shape[1] != 1:
        return None
    r = k_res.shape[2]
    r2 = max(16, 1 << (r - 1).bit_length())
    if r2 != r:
        pad = ((0, 0), (0, 0), (0, r2 - r), (0, 0))
        k_res, v_res = jnp.pad(k_res, pad), jnp.pad(v_res, pad)
    try:
        out, _ = kernel.quantized_decode_attention(
            q,
            k_codes,
            k_scale,
            k_zero,
            v_codes,
            v_scale,
            v_zero,
            lengths,
            bits=bits,
            k_res=k_res.astype(q.dtype),
            v_res=v_res.astype(q.dtype),
            res_lengths=res_len,
        )
    except ValueError:  # shape constraints of the kernel (checked at trace time)
        return None
    return out


def mgpu_kivi_attention(q, fr, lengths, k_res, v_res, res_len, *, bits: int):
    """Adapter to the Hopper kernel (pallas_kernels/kivi_mgpu) for a
    cache in its fragment layout: every residual slot below res_len is visible (the decode
    query is the newest token). The kernel computes in bf16 (f16 for 8-bit codes; a float32
    model's query and residual window are rounded to bf16; the output comes back in q's
    dtype). None (the caller runs the reference) off a Hopper GPU or for shapes the kernel does
    not take."""
    from ..pallas_kernels import _compat
    from ..pallas_kernels import kivi_mgpu as kernel

    if _compat.backend_kind() != "mosaic_gpu":
        return None
    bf16 = jnp.bfloat16
    try:
        out, _ = kernel.quantized_decode_attention_mgpu(
            q.astype(bf16),
            fr,
            lengths,
            bits=bits,
            k_res=k_res.astype(bf16),
            v_res=v_res.astype(bf16),
            res_lengths=res_len,
        )
    except ValueError:  # shape constraints of the kernel (checked at trace time)
        return None
    return out.astype(q.dtype)


register_quantized_kernel("pallas", pallas_kivi_attention)
