"""Bit packing of low-bit integer codes into uint32 words (the layout the quantized
decode kernel reads).

bits in {2, 4, 8}: `32 // bits` codes per word, code j of a word in bits [j*bits, (j+1)*bits).
bits == 3: bit planes; every 32 codes along the axis become 3 words (plane 0, 1, 2),
so 3-bit storage is exactly 3 bits per code. The packed axis length must be a multiple
of the codes per word (2/4/8 bit) or of 32 (3 bit).

Keys are packed along tokens and values along channels (KIVI's layout), so callers pass
the axis; everything else is elementwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SUPPORTED_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")


def codes_per_word(bits: int) -> int:
    """Codes sharing one uint32 word (32 for 3-bit: one bit-plane word holds 32 codes)."""
    check_bits(bits)
    return 32 if bits == 3 else 32 // bits


def packed_length(length: int, bits: int) -> int:
    """Words along the packed axis for `length` codes."""
    per = codes_per_word(bits)
    if length % per:
        raise ValueError(f"packed axis length {length} must be a multiple of {per} for bits={bits}")
    return length // per * (3 if bits == 3 else 1)


def pack(codes: jax.Array, bits: int, axis: int) -> jax.Array:
    """codes (integers in [0, 2**bits)) -> uint32 words packed along `axis`."""
    axis = axis % codes.ndim
    length = codes.shape[axis]
    packed_length(length, bits)
    c = jnp.moveaxis(codes.astype(jnp.uint32), axis, -1)
    if bits == 3:
        c = c.reshape(*c.shape[:-1], length // 32, 32)
        shifts = jnp.arange(32, dtype=jnp.uint32)
        planes = [jnp.sum(((c >> p) & 1) << shifts, axis=-1, dtype=jnp.uint32) for p in range(3)]
        w = jnp.stack(planes, axis=-1).reshape(*c.shape[:-2], length // 32 * 3)
    else:
        per = 32 // bits
        c = c.reshape(*c.shape[:-1], length // per, per)
        shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).astype(jnp.uint32)
        w = jnp.sum(c << shifts, axis=-1, dtype=jnp.uint32)
    return jnp.moveaxis(w, -1, axis)


def unpack(words: jax.Array, bits: int, axis: int) -> jax.Array:
    """Inverse of `pack`: uint32 words -> int32 codes along `axis`."""
    axis = axis % words.ndim
    w = jnp.moveaxis(words.astype(jnp.uint32), axis, -1)
    if bits == 3:
        w = w.reshape(*w.shape[:-1], w.shape[-1] // 3, 3)
        shifts = jnp.arange(32, dtype=jnp.uint32)
        planes = [(w[..., p : p + 1] >> shifts) & 1 for p in range(3)]
        c = planes[0] | (planes[1] << 1) | (planes[2] << 2)
        c = c.reshape(*c.shape[:-2], -1)
    else:
        check_bits(bits)
        per = 32 // bits
        shifts = (jnp.arange(per, dtype=jnp.uint32) * bits).astype(jnp.uint32)
        c = (w[..., None] >> shifts) & jnp.uint32((1 << bits) - 1)
        c = c.reshape(*c.shape[:-2], -1)
    return jnp.moveaxis(c.astype(jnp.int32), -1, axis)
