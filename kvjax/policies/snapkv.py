"""SnapKV: keep what the last queries of the prompt attend to.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024),
arXiv:2404.14469. The observation window (the last `window` prompt tokens) attends over
the prompt; its weights, averaged over the window, pooled with a `kernel`-wide average
(clustering neighbours) and averaged over the query heads of each KV head, score every
slot [B, N, S]; the window itself is always kept; top-k per KV head survive.

Per row (true length L, not the padded bucket): min(L, max(floor(budget * L), window))
tokens are kept, so a prompt no longer than the window is kept whole and a budget smaller
than the window still keeps the whole window (kvpress's SnapKVPress refuses such prompts).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from . import slots
from .base import check_positive
from .eviction import EvictionPolicy, protect_window, window_attention
from .registry import register


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(EvictionPolicy):
    """budget: fraction kept; window: observation queries; kernel: pooling width."""

    name = "snapkv"
    budget: float = 0.2
    window: int = 64
    kernel: int = 5

    def __post_init__(self):
        super().__post_init__()
        check_positive("window", self.window)
        check_positive("kernel", self.kernel)

    def keep_floor(self) -> int:
        return self.window

    def scores(self, state, q, q_pos, res, ctx):
        w = window_attention(state, q, q_pos, self.window, ctx)  # [B, N, G, W, S]
        s = slots.pool1d(jnp.mean(w, axis=3), self.kernel, "avg")  # [B, N, G, S]
        return protect_window(jnp.mean(s, axis=2), state, self.window)
