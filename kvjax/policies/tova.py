"""TOVA: Token Omission Via Attention.

Oren et al., "Transformers are Multi-State RNNs" (2024), arXiv:2401.06104. The last
query's attention, averaged over all query heads, scores every slot (one score shared by
all KV heads); the lowest are dropped. While decoding the cache keeps its size: after
each step the slot the current query attends to least is freed (the paper's method).
`on_decode=false` compresses the prompt only and lets decoding append, as kvpress's
TOVAPress does: with decode-time eviction an answer can lose the very tokens it is
copying (a passkey answer can lose digits of the key it is writing out), so the two
behaviours are worth comparing.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from .eviction import EvictionPolicy, protect_window, window_attention
from .registry import register


def _head_mean(probs):
    """[B, N, G, T, S] -> [B, N, S]: mean over all query heads and queries, shared by KV heads."""
    s = jnp.mean(probs, axis=(1, 2, 3))  # [B, S]
    return jnp.broadcast_to(s[:, None, :], (probs.shape[0], probs.shape[1], probs.shape[-1]))


@register
@dataclasses.dataclass(frozen=True)
class TOVA(EvictionPolicy):
    """budget: fraction of the prompt kept (then kept constant while decoding);
    on_decode: evict one slot per decode step too (the paper) or not (kvpress)."""

    name = "tova"
    budget: float = 0.2
    on_decode: bool = True

    @property
    def evicts_on_decode(self) -> bool:  # type: ignore[override]
        return self.on_decode

    def scores(self, state, q, q_pos, res, ctx):
        return protect_window(_head_mean(window_attention(state, q, q_pos, 1, ctx)), state, 1)

    def decode_score(self, st, res, q_pos, ctx):
        # key_mass sums the current query's weights over the G heads of each KV head;
        # TOVA averages over all query heads, shared by every KV head.
        # Slots stay aligned across KV heads (identical scores and positions), so averaging
        # over the KV-head axis averages over every query head.
        mass = jnp.mean(res.key_mass, axis=1, keepdims=True) / ctx.config.group_size
        return jnp.broadcast_to(mass, st.kv.pos.shape)
