"""PyramidKV: SnapKV scores with a pyramid of per-layer budgets.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
Funneling" (2024), arXiv:2406.02069. Lower layers keep more tokens, upper layers fewer,
linearly, with the same total as SnapKV at that budget. Budget formula as in the authors'
KVCache-Factory and kvpress (beta sets the steepness). Each layer's state has its own
static capacity, so the savings are real per layer.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .base import PolicyError
from .registry import register
from .snapkv import SnapKV


def layer_budget(length, budget: float, window: int, beta: int, layer: int, num_layers: int):
    """Tokens kept by `layer` for a prompt of `length` tokens (python ints or jnp arrays)."""
    xp = jnp if not isinstance(length, int) else None
    max_cap = window + length * budget
    min_num = (max_cap - window) / beta
    max_num = (max_cap - window) * 2 - min_num
    if xp is None:
        if max_num >= length - window:
            max_num = length - window
            min_num = (max_cap - window) * 2 - max_num
        if not (length >= max_num >= min_num >= window):
            return max(1, round(length * budget))
        steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
        return round(max_num - layer * steps)
    over = max_num >= length - window
    max_num = jnp.where(over, length - window, max_num)
    min_num = jnp.where(over, (max_cap - window) * 2 - max_num, min_num)
    ok = (length >= max_num) & (max_num >= min_num) & (min_num >= window)
    steps = (max_num - min_num) / (num_layers - 1) if num_layers > 1 else 0.0
    pyramid = jnp.round(max_num - layer * steps)
    flat = jnp.maximum(1, jnp.round(length * budget))
    return jnp.where(ok, pyramid, flat).astype(jnp.int32)


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

    def capacity(self, prompt_len, ctx):
        n = layer_budget(prompt_len, self.budget, self.window, self.beta, ctx.layer, ctx.config.num_layers)
        return max(1, min(prompt_len, n))

    def keep_counts(self, lengths, ctx):
        n = layer_budget(lengths, self.budget, self.window, self.beta, ctx.layer, ctx.config.num_layers)
        return jnp.clip(n, 1, jnp.minimum(lengths, self.capacity(ctx.prompt_len, ctx)))
