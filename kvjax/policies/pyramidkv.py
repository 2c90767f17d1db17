"""PyramidKV: SnapKV scores with a pyramid of per-layer budgets.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2024), arXiv:2406.02069. Lower layers keep more tokens, upper layers fewer,
linearly, with the same total as SnapKV at that budget. Budget formula as in the authors'
KVCache-Factory and kvpress (beta sets the steepness). Each layer's state has its own
static capacity, so the savings are real per layer.

Per row (true length L), as SnapKV: a layer keeps at least min(L, window) tokens, so a row
no longer than the window is kept whole. The pyramid's count is not monotone in L (it
switches between the pyramid and SnapKV's flat budget), so each layer's static capacity is
the largest count over every length up to the batch's bound, and a row keeps the same
tokens alone or in any batch.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .base import PolicyError
from .registry import register
from .snapkv import SnapKV


def layer_budget(length, budget: float, window: int, beta: int, layer: int, num_layers: int, xp=jnp):
    """Tokens kept by `layer` for prompts of `length` tokens (an array; xp = jnp or np), as
    kvpress's PyramidKVPress.get_layer_budget: the pyramid where it is well formed, else
    max(1, round(length * budget))."""
    length = xp.asarray(length).astype(xp.float32)
    max_cap = window + length * budget
    min_num = (max_cap - window) / beta
    max_num = (max_cap - window) * 2 - min_num
    over = max_num >= length - window
    max_num = xp.where(over, length - window, max_num)
    min_num = xp.where(over, (max_cap - window) * 2 - max_num, min_num)
    ok = (length >= max_num) & (max_num >= min_num) & (min_num >= window)
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    pyramid = xp.round(max_num - layer * steps)
    flat = xp.maximum(1, xp.round(length * budget))
    return xp.where(ok, pyramid, flat).astype(xp.int32)


@register
@dataclasses.dataclass(frozen=True)
class PyramidKV(SnapKV):
    """budget: average fraction kept over layers; window, kernel: as SnapKV; beta: steepness."""

    name = "pyramidkv"
    budget: float = 0.2
    window: int = 64
    kernel: int = 5
    beta: int = 20

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.beta, int) or self.beta < 1:
            raise PolicyError(f"beta={self.beta!r} must be an integer >= 1")

    def _counts(self, lengths, layer: int, num_layers: int, xp):
        n = layer_budget(lengths, self.budget, self.window, self.beta, layer, num_layers, xp)
        return xp.minimum(xp.maximum(n, self.window), lengths)

    def capacity(self, prompt_len, ctx):
        """The largest count of this layer over every true length up to `prompt_len`."""
        lengths = np.arange(1, max(1, prompt_len) + 1, dtype=np.int32)
        return int(np.max(self._counts(lengths, ctx.layer, ctx.config.num_layers, np)))

    def keep_counts(self, lengths, ctx):
        return self._counts(lengths, ctx.layer, ctx.config.num_layers, jnp)
