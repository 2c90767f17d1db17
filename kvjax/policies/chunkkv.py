"""ChunkKV: evict whole chunks of consecutive tokens instead of single tokens.

Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context
LLM Inference" (2025), arXiv:2502.00299. Token-level eviction scores each token alone, so a
kept phrase can lose some of its tokens (a kept pass key can lose some of its digits).
ChunkKV splits the prompt into chunks of `chunk` consecutive positions, scores each chunk by
the mean, over its tokens, of a token-level scorer's scores summed over the KV heads, and
keeps the best chunks in every KV head of the layer (one kept set per layer, as in the paper
and kvpress's ChunkKVPress).

The token-level scorer (`scorer`) is SnapKV's observation window (the paper's choice; with
`window` and `kernel`), TOVA's last query or key norms. The state keeps floor(budget *
length) slots per row, so the chunk that crosses the budget is kept in part (kvpress keeps
floor(chunks * budget) whole chunks instead; the two agree whenever chunk divides the
budget). The paper's optional layer-wise index reuse is not implemented.

Per row (true length L): with SnapKV scores a row keeps at least `window` tokens (all of a
row not longer than the window), as SnapKV does; with TOVA or key-norm scores at least 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .base import PolicyError, check_positive
from .eviction import EvictionPolicy
from .knorm import KNorm
from .registry import register
from .snapkv import SnapKV
from .tova import TOVA

SCORERS = ("snapkv", "tova", "knorm")


def chunk_scores(scores: jax.Array, pos: jax.Array, chunk: int, n_positions: int) -> jax.Array:
    """Per-slot chunk scores [B, N, S] from token scores [B, N, S] and slot positions pos
    [B, N, S] (-1 = empty; slots aligned over heads; every position < n_positions): each
    slot gets the mean, over the slots of its chunk (positions chunk*c .. chunk*(c+1)-1), of
    the scores summed over the N KV heads. Equal for all heads, so every head keeps the same
    chunks."""
    b, n, s = scores.shape
    n_chunks = -(-max(s, n_positions) // chunk) + 1  # the last segment collects empty slots
    cid = jnp.where(pos[:, 0] >= 0, pos[:, 0] // chunk, n_chunks - 1)  # [B, S] (slots aligned over heads)
    filled = jnp.where(pos[:, 0] >= 0, 1.0, 0.0)
    total = jnp.sum(jnp.where(pos >= 0, scores.astype(jnp.float32), 0.0), axis=1)  # [B, S]

    def per_row(t, f, c):
        sums = jax.ops.segment_sum(t, c, num_segments=n_chunks)
        counts = jax.ops.segment_sum(f, c, num_segments=n_chunks)
        return (sums / jnp.maximum(counts, 1.0))[c]

    mean = jax.vmap(per_row)(total, filled, cid)  # [B, S]
    return jnp.broadcast_to(mean[:, None, :], (b, n, s))


@register
@dataclasses.dataclass(frozen=True)
class ChunkKV(EvictionPolicy):
    """budget: fraction kept; chunk: tokens per chunk; scorer: token scores from snapkv,
    tova or knorm; window / kernel: SnapKV's observation window and pooling width."""

    name = "chunkkv"
    budget: float = 0.2
    chunk: int = 10
    scorer: str = "snapkv"
    window: int = 64
    kernel: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_positive("chunk", self.chunk)
        check_positive("window", self.window)
        check_positive("kernel", self.kernel)
        if self.scorer not in SCORERS:
            raise PolicyError(f"chunkkv: scorer={self.scorer!r}; expected one of {SCORERS}")

    def keep_floor(self) -> int:
        return self.token_scorer().keep_floor()

    def token_scorer(self) -> EvictionPolicy:
        """The token-level policy whose scores the chunks average."""
        if self.scorer == "snapkv":
            return SnapKV(budget=self.budget, window=self.window, kernel=self.kernel)
        if self.scorer == "tova":
            return TOVA(budget=self.budget, on_decode=False)
        return KNorm(budget=self.budget)

    def scores(self, state, q, q_pos, res, ctx):
        token = self.token_scorer().scores(state, q, q_pos, res, ctx)
        return chunk_scores(token, state.pos, self.chunk, ctx.prompt_len)
