"""Decode attention over a KIVI-layout quantized state, behind one dispatcher.

`kivi_decode_attention_reference` is the jnp reference (dequantize, then exact
attention over quantized tokens + the full-precision residual window, merged through
their log-sum-exps). A fused kernel (pallas_kernels/quantized_decode_attention.py) plugs
in with `register_quantized_kernel(name, fn)`; it is used only when the layer's
`ctx.implementation` names it, with the same arguments as the reference, so results
never change behind the caller's back: with no registered kernel the reference runs.
"""

from __future__ import annotations

import jax.numpy as jnp

from .. import attention
from . import affine

_KERNELS: dict = {}


def register_quantized_kernel(name: str, fn) -> None:
    """fn(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, k_res, v_res,
    res_len, *, bits, group, res_pos, q_pos) -> out [B, T, Nq, H]."""
    _KERNELS[name] = fn


def registered_kernels() -> tuple:
    return tuple(sorted(_KERNELS))


def kivi_decode_attention_reference(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, k_res, v_res,
                                    res_len, *, bits: int, group: int, res_pos=None, q_pos=None):
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
    """The registered kernel for ctx.implementation applied to a KIVI QuantState, or None."""
    fn = _KERNELS.get(ctx.implementation or "")
    if fn is None or ctx.config.sliding_window is not None:
        return None
    d = state.streams[0].data
    return fn(q, d.k_codes, d.k_scale, d.k_zero, d.v_codes, d.v_scale, d.v_zero, state.streams[0].count,
              state.res_k, state.res_v, state.res_len, bits=bits, group=group, res_pos=state.res_pos, q_pos=q_pos)
