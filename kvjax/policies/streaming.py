"""StreamingLLM: attention sinks + a window of recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (2023),
arXiv:2309.17453. Keeps the first `sink` tokens and the most recent ones; the rest is
freed. Decoding keeps the same size: each new token evicts the oldest non-sink token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .base import PolicyError, check_positive
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

    def validate(self, prompt_len, config):
        if prompt_len <= self.sink:
            raise PolicyError(f"prompt of {prompt_len} tokens must be longer than sink={self.sink}")

    def capacity(self, prompt_len, ctx):
        return max(super().capacity(prompt_len, ctx), min(self.sink + 1, prompt_len))

    def scores(self, state, q, q_pos, res, ctx):
        # Position order: older = lower, sinks = top. Selecting the top-k then keeps the sinks
        # and the most recent tokens, exactly kvpress's StreamingLLMPress.
        pos = state.pos.astype(jnp.float32)
        return jnp.where(state.pos < self.sink, jnp.inf, pos)

    def decode_score(self, st, res, q_pos, ctx):
        return self.scores(st.kv, None, None, None, ctx)
