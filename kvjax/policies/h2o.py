"""H2O: Heavy-Hitter Oracle.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
Language Models" (2023), arXiv:2306.14048. Each slot's score is the attention mass it has
accumulated from every query so far (prompt and generated tokens, summed over the query
heads of its KV head); the cache keeps the heavy hitters plus a window of recent tokens,
and keeps that size while decoding (after each step the lightest non-recent slot is freed).

`normalize=True` divides each prompt token's mass by the number of queries that could see
it (kvpress's ObservedAttentionPress); with `recent=0` the prompt selection is exactly that
press's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from . import slots
from .base import PolicyError
from .eviction import EvictionPolicy
from .registry import register


def _protect_recent(score, pos, fraction: float):
    """score with each (row, head)'s `fraction` most recent valid slots set to +inf."""
    if fraction <= 0:
        return score
    n_valid = jnp.sum(pos >= 0, axis=2, keepdims=True)
    n_recent = jnp.floor(n_valid * fraction).astype(jnp.int32)
    newest = jnp.max(pos, axis=2, keepdims=True)
    return jnp.where((pos >= 0) & (pos > newest - n_recent), jnp.inf, score)


@register
@dataclasses.dataclass(frozen=True)
class H2O(EvictionPolicy):
    """budget: fraction kept; recent: share of the kept slots reserved for the most recent
    tokens (the paper splits heavy hitters and recent tokens evenly); normalize: see doc."""

    name = "h2o"
    budget: float = 0.2
    recent: float = 0.5
    normalize: bool = False
    evicts_on_decode = True

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.recent < 1.0:
            raise PolicyError(f"recent={self.recent} must be a fraction of the budget in [0, 1)")

    def wants_mass(self, ctx):
        return True

    def carried_score(self, state, res, ctx):
        mass = res.key_mass.astype(jnp.float32)  # [B, N, S], summed over queries and G heads
        if self.normalize:
            lengths = slots.row_lengths(state.pos)
            mass = mass / jnp.maximum(lengths[:, None, None] - state.pos, 1).astype(jnp.float32)
        return mass

    def scores(self, state, q, q_pos, res, ctx):
        # Recent tokens of the prompt: the last `recent * keep` positions of each row.
        lengths = slots.row_lengths(state.pos)
        n_recent = jnp.floor(slots.keep_counts(lengths, self.budget) * self.recent).astype(jnp.int32)
        recent = (state.pos >= 0) & (state.pos >= (lengths - n_recent)[:, None, None])
        return jnp.where(recent, jnp.inf, self.carried_score(state, res, ctx))

    def decode_score(self, st, res, q_pos, ctx):
        return st.score + res.key_mass.astype(jnp.float32)

    def eviction_rank(self, score, kv):
        return _protect_recent(score, kv.pos, self.recent)
