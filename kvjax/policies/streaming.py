"""StreamingLLM: attention sinks + a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (2023),
arXiv:2309.17453. Keeps the first `sink` tokens and the most recent ones; the rest is
freed. Decoding keeps the same size: each new token evicts the oldest non-sink token.
Per row (true length L): at least `sink + 1` tokens are kept (the sinks and the newest
token), so a row of at most sink + 1 tokens is kept whole.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .base import check_positive
from .eviction import EvictionPolicy
from .registry import register


@register
@dataclasses.dataclass(frozen=True)
class StreamingLLM(EvictionPolicy):
    """budget: fraction of the prompt kept (sinks included); sink: leading tokens kept.
    Scores [B, N, S]: sinks and recent tokens high, middle tokens low (kvpress parity)."""

    name = "streaming"
    budget: float = 0.2
    sink: int = 4
    evicts_on_decode = True

    def __post_init__(self):
        super().__post_init__()
        check_positive("sink", self.sink, 0)

    def keep_floor(self) -> int:
        return self.sink + 1

    def scores(self, state, q, q_pos, res, ctx):
        # Position order: older = lower, sinks = top. Selecting the top-k then keeps the sinks
        # and the most recent tokens, exactly kvpress's StreamingLLMPress.
        pos = state.pos.astype(jnp.float32)
        return jnp.where(state.pos < self.sink, jnp.inf, pos)

    def decode_score(self, st, res, q_pos, ctx):
        return self.scores(st.kv, None, None, None, ctx)
