"""Uniform asymmetric (min-max) quantization, packing with padding, and the Walsh-Hadamard
transform: the building blocks every quantized cache in `kvjax.quant` shares.

Layouts (KIVI, arXiv:2402.02750): x [B, N, S, H] (heads-major cache).
    channel-wise (keys):  groups of G tokens per channel; codes packed ALONG TOKENS
        codes uint32 [B, N, S/per_word, H], scale/zero [B, N, S/G, H]
    token-wise (values):  groups of G channels per token; codes packed ALONG CHANNELS
        codes uint32 [B, N, S, H/per_word], scale/zero [B, N, S, H/G]
dequant = code * scale + zero (scale, zero stored in float16, codes computed with the
rounded scale/zero so the stored numbers are the ones the error bound is about).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..pallas_kernels import packing

SCALE_DTYPE = jnp.float16


def check_bits(bits: int, allowed=packing.SUPPORTED_BITS) -> None:
    """Raise ValueError naming `bits` unless it is one of `allowed`."""
    if bits not in allowed:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {tuple(allowed)}")


def minmax_params(x: jax.Array, bits: int, axis, clip: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Asymmetric min-max scale and zero over `axis` (kept), rounded to float16; `clip`
    < 1 shrinks the range (values outside saturate)."""
    mn = jnp.min(x, axis=axis, keepdims=True).astype(jnp.float32) * clip
    mx = jnp.max(x, axis=axis, keepdims=True).astype(jnp.float32) * clip
    scale = ((mx - mn) / (2**bits - 1)).astype(SCALE_DTYPE)
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))  # constant group: any scale is exact
    return scale, mn.astype(SCALE_DTYPE)


def quantize(x: jax.Array, scale: jax.Array, zero: jax.Array, bits: int) -> jax.Array:
    """Round-to-nearest codes in [0, 2**bits) (int32) for x with broadcastable scale/zero."""
    c = jnp.round((x.astype(jnp.float32) - zero.astype(jnp.float32)) / scale.astype(jnp.float32))
    return jnp.clip(c, 0, 2**bits - 1).astype(jnp.int32)


def dequantize(codes: jax.Array, scale: jax.Array, zero: jax.Array) -> jax.Array:
    """codes * scale + zero in float32."""
    return codes.astype(jnp.float32) * scale.astype(jnp.float32) + zero.astype(jnp.float32)


def pack(codes: jax.Array, bits: int, axis: int) -> jax.Array:
    """`packing.pack` after zero-padding `axis` to a whole number of words (padding codes
    cost bytes and are counted as such)."""
    axis = axis % codes.ndim
    per = packing.codes_per_word(bits)
    pad = (-codes.shape[axis]) % per
    if pad:
        widths = [(0, 0)] * codes.ndim
        widths[axis] = (0, pad)
        codes = jnp.pad(codes, widths)
    return packing.pack(codes, bits, axis)


def unpack(words: jax.Array, bits: int, axis: int, length: int) -> jax.Array:
    """Inverse of `pack`: int32 codes with `length` entries along `axis`."""
    codes = packing.unpack(words, bits, axis)
    return jax.lax.slice_in_dim(codes, 0, length, axis=axis % codes.ndim)


def quant_channelwise(x: jax.Array, bits: int, group: int):
    """Keys per channel (KIVI): x [B, N, S, H], S a multiple of `group` (itself a multiple
    of the codes per word) -> (codes [B, N, S/per_word, H], scale, zero [B, N, S/G, H])."""
    b, n, s, h = x.shape
    if s % group:
        raise ValueError(f"token count {s} must be a multiple of group={group}")
    xg = x.reshape(b, n, s // group, group, h)
    scale, zero = minmax_params(xg, bits, axis=3)
    codes = quantize(xg, scale, zero, bits).reshape(b, n, s, h)
    return packing.pack(codes, bits, axis=2), scale[:, :, :, 0], zero[:, :, :, 0]


def dequant_channelwise(codes, scale, zero, bits: int, group: int) -> jax.Array:
    """Inverse of `quant_channelwise`: float32 [B, N, S, H]."""
    c = packing.unpack(codes, bits, axis=2)
    b, n, s, h = c.shape
    c = c.reshape(b, n, s // group, group, h)
    return dequantize(c, scale[:, :, :, None], zero[:, :, :, None]).reshape(b, n, s, h)


def quant_tokenwise(x: jax.Array, bits: int, group: int, clip: float = 1.0):
    """Values per token (KIVI) in groups of `group` channels: x [B, N, S, H] ->
    (codes [B, N, S, H/per_word], scale, zero [B, N, S, H/G])."""
    b, n, s, h = x.shape
    if h % group:
        raise ValueError(f"group={group} must divide head_dim={h}")
    xg = x.reshape(b, n, s, h // group, group)
    scale, zero = minmax_params(xg, bits, axis=4, clip=clip)
    codes = quantize(xg, scale, zero, bits).reshape(b, n, s, h)
    return pack(codes, bits, axis=3), scale[..., 0], zero[..., 0]


def dequant_tokenwise(codes, scale, zero, bits: int, group: int, head_dim: int) -> jax.Array:
    """Inverse of `quant_tokenwise`: float32 [B, N, S, head_dim]."""
    c = unpack(codes, bits, axis=3, length=head_dim)
    b, n, s, h = c.shape
    c = c.reshape(b, n, s, h // group, group)
    return dequantize(c, scale[..., None], zero[..., None]).reshape(b, n, s, h)


def fwht(x: jax.Array) -> jax.Array:
    """Orthonormal fast Walsh-Hadamard transform over the last axis (a power of two).
    Self-inverse: fwht(fwht(x)) == x. Computed in float32."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"Walsh-Hadamard size {n} must be a power of two")
    shape = x.shape
    y = x.astype(jnp.float32)
    h = 1
    while h < n:
        y = y.reshape(*shape[:-1], n // (2 * h), 2, h)
        y = jnp.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], axis=-2)
        h *= 2
    return y.reshape(shape) / math.sqrt(n)
