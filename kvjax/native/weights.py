"""A weight that carries both a float matrix and the GGUF blocks it came from, and the matmul
dispatch the model's dense layers use.

    w = QuantizedWeight(weight, blocks, "q4_1")   # a pytree: two array leaves, static block type
    y = dense_matmul(x, w, float_fn)              # x [..., K] -> [..., N]; float_fn(x) is the float path

`weight` is the float array exactly as the float path stores it (a linen Dense kernel [K, N] or
an embedding table [N, K]); `blocks` is uint8 [N, K/32*bytes], the rows of W [N, K] (output
features x input features). Few rows of x (decode: batch x 1 token, at most
`QUANTIZED_MAX_ROWS`, a static shape decision) on a CPU backend read the blocks through the
native kernel; anything else (prefill, other backends) uses `weight`, unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from .quantized_matmul import quantized_matmul

# Rows of x up to which the blocks are read (a static shape choice). With few rows (decode:
# batch x 1 token) the matmul is bound by reading the weights, so the smaller blocks pay; with
# many (prefill chunks, hundreds of rows) it is bound by arithmetic, where XLA's float32 dot is
# the better kernel (BENCHMARKS.md, CPU generation).
QUANTIZED_MAX_ROWS = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """weight: float [K, N] (dense kernel) or [N, K] (embedding); blocks: uint8 [N, K/32*bytes];
    block_type: "q4_1" or "q8_0" (static)."""

    weight: jax.Array
    blocks: jax.Array
    block_type: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.weight.shape

    @property
    def dtype(self):
        return self.weight.dtype


def concatenate(weights, axis: int):
    """Concatenate dense kernels [K, N_i] along N (axis -1 / 1): the float weights along `axis`,
    the blocks along their rows. Plain arrays, or blocks of different types, give a plain array."""
    floats = [w.weight if isinstance(w, QuantizedWeight) else w for w in weights]
    out = jnp.concatenate(floats, axis=axis)
    types = {w.block_type if isinstance(w, QuantizedWeight) else None for w in weights}
    if len(types) != 1 or None in types:
        return out
    return QuantizedWeight(out, jnp.concatenate([w.blocks for w in weights], axis=0), types.pop())


def _use_blocks(x) -> bool:
    return math.prod(x.shape[:-1]) <= QUANTIZED_MAX_ROWS


def _on_cpu(x, blocks, block_type, float_fn):
    """The kernel on CPU; `float_fn` elsewhere (decided when lowering for a platform)."""
    return jax.lax.platform_dependent(
        x,
        blocks,
        cpu=lambda a, b: quantized_matmul(a, b, block_type),
        default=lambda a, b: float_fn(a).astype(jnp.float32),
    )


def dense_matmul(x, kernel, float_fn):
    """x [..., K] -> [..., N]: `float_fn(x)` (the float path over kernel [K, N]) unless `kernel`
    is a QuantizedWeight and x has few rows, then the blocks (float32 result cast to x.dtype)."""
    if not isinstance(kernel, QuantizedWeight) or not _use_blocks(x):
        return float_fn(x)
    return _on_cpu(x, kernel.blocks, kernel.block_type, float_fn).astype(x.dtype)


def float_weight(w):
    """The float array of a QuantizedWeight, or `w` itself."""
    return w.weight if isinstance(w, QuantizedWeight) else w
