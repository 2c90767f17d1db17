"""x @ W^T with W kept as GGUF quantized blocks: the native CPU kernel and its jnp reference.

    y = quantized_matmul(x, blocks, "q4_1")              # x [..., K] -> y [..., N] float32
    y = quantized_matmul_reference(x, blocks, "q4_1")    # the same in jnp (dequantize, then dot)

`blocks` is uint8 [N, K / 32 * block_bytes]: row n holds W[n, :] as llama.cpp stores it (the
`data` of a `gguf.GGUFReader` tensor). Block layouts (checked against `gguf.quants` in the tests):

    q4_1: 20 bytes per 32 weights: fp16 d, fp16 m, 16 bytes; byte j's low nibble is weight j,
          its high nibble weight j + 16; w = d * q + m
    q8_0: 34 bytes per 32 weights: fp16 d, 32 int8 q; w = d * q

The kernel (`gguf_matmul.cc`, built on first use by `kvjax.native.build`) computes in float32
and equals the reference up to summation order: activations are not quantized. Without a C++
compiler it falls back, after one warning, to the reference (XLA dequantize + dot).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from . import build

BLOCK_SIZE = 32
# block type -> bytes per block of 32 weights
BLOCK_BYTES = {"q4_1": 20, "q8_0": 34}


# block type -> the FFI target (registered by kvjax.native.build)
TARGETS = {t: f"kvjax_gguf_matmul_{t}" for t in BLOCK_BYTES}


def check_blocks(blocks, block_type: str, k: int) -> int:
    """Validate `blocks` [N, K/32*bytes] uint8 for `block_type` and K; returns N.
    Raises ValueError naming the bad value and what was expected."""
    if block_type not in BLOCK_BYTES:
        raise ValueError(f"{block_type=} is not supported; expected one of {sorted(BLOCK_BYTES)}")
    if k % BLOCK_SIZE:
        raise ValueError(f"K={k} must be a multiple of the GGUF block size {BLOCK_SIZE}")
    if blocks.dtype != np.uint8:
        raise ValueError(f"blocks.dtype={blocks.dtype} must be uint8 (raw GGUF block bytes)")
    row_bytes = k // BLOCK_SIZE * BLOCK_BYTES[block_type]
    if blocks.ndim != 2 or blocks.shape[1] != row_bytes:
        raise ValueError(
            f"blocks.shape={tuple(blocks.shape)} does not hold {block_type} rows of K={k} weights; "
            f"expected [N, {row_bytes}] (K/{BLOCK_SIZE} blocks of {BLOCK_BYTES[block_type]} bytes)"
        )
    return int(blocks.shape[0])


def _check_x(x):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x.dtype={x.dtype} must be floating point")
    if x.ndim < 1:
        raise ValueError(f"x.shape={tuple(x.shape)} must have a last (K) axis")


def _fp16(b):
    """uint8 [..., 2] (little endian) -> float32 [...]."""
    bits = b[..., 0].astype(jnp.uint16) | (b[..., 1].astype(jnp.uint16) << 8)
    return jax.lax.bitcast_convert_type(bits, jnp.float16).astype(jnp.float32)


def dequantize_reference(blocks, block_type: str, k: int) -> jax.Array:
    """blocks uint8 [N, K/32*bytes] -> W float32 [N, K] (jnp; as gguf.quants.dequantize)."""
    n = check_blocks(blocks, block_type, k)
    b = jnp.asarray(blocks).reshape(n, k // BLOCK_SIZE, BLOCK_BYTES[block_type])
    d = _fp16(b[..., 0:2])[..., None]
    if block_type == "q4_1":
        m = _fp16(b[..., 2:4])[..., None]
        qs = b[..., 4:]
        q = jnp.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(jnp.float32)  # weights 0..15, 16..31
        w = d * q + m
    else:
        w = d * jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    return w.reshape(n, k)


def quantized_matmul_reference(x, blocks, block_type: str) -> jax.Array:
    """x [..., K] float, blocks [N, K/32*bytes] -> x @ dequantize(blocks)^T, float32 [..., N]."""
    _check_x(x)
    w = dequantize_reference(blocks, block_type, x.shape[-1])
    return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)


def native_available() -> bool:
    """True if the C++ kernel is built and registered (builds it on the first call)."""
    return build.load() is not None


def quantized_matmul(x, blocks, block_type: str) -> jax.Array:
    """x [..., K] float, blocks uint8 [N, K/32*bytes] -> float32 [..., N] = x @ dequantize(W)^T.

    Runs the native CPU kernel (a custom call; CPU only); if it cannot be built, the reference.
    Meant for few rows (decode): it reads W's blocks once per call, whatever the rows of x."""
    _check_x(x)
    k = x.shape[-1]
    check_blocks(blocks, block_type, k)
    if not native_available():
        return quantized_matmul_reference(x, blocks, block_type)
    return _ffi_matmul(x, blocks, TARGETS[block_type])


def _ffi_matmul(x, blocks, target: str):
    """The custom call: x [..., K] -> [..., N] through the registered FFI target `target`."""
    lead, k, n = x.shape[:-1], x.shape[-1], blocks.shape[0]
    m = math.prod(lead)
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")(
        x.reshape(m, k).astype(jnp.float32), blocks
    )
    return y.reshape(*lead, n)
