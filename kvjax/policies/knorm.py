"""Key-norm eviction: keep the keys with the smallest L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(2024), arXiv:2406.11430. Score = -||k|| per slot [B, N, S]; no attention needed.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .eviction import EvictionPolicy
from .registry import register


@register
@dataclasses.dataclass(frozen=True)
class KNorm(EvictionPolicy):
    """budget: fraction of the prompt kept per KV head."""

    name = "knorm"
    budget: float = 0.2

    def scores(self, state, q, q_pos, res, ctx):
        return -jnp.linalg.norm(state.k.astype(jnp.float32), axis=-1)
