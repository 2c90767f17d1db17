"""TriForce retrieval cache: the sink chunk plus the chunks of 8 keys the last prompt query favours.

Sun et al., "TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical
Speculative Decoding" (2024), arXiv:2404.11912. The prompt's keys are cut into chunks of
`chunk` (8) consecutive tokens; each chunk is scored by the last prompt query against the
chunk's mean key; the first chunk (the attention sinks) is always kept and the best-scoring
other chunks fill a budget of `budget` tokens (the paper: 4096 tokens of a 128k context, 1/32;
the same fraction of SmolLM2's 8k is 256, the default here; a budget <= 1 is a fraction of
each row's prompt instead). Decoding appends every new token
after the kept chunks (nothing is evicted while decoding), so the state rolls back exactly
(`Policy.truncate`): the middle level of TriForce's hierarchy (`kvjax.generation.speculative`),
where the target model drafts over this cache for itself over the full one.

Per KV head (GQA): a chunk's score is the mean over the head's query group of q_last . mean_k
(the paper's model has one query head per KV head; the mean keeps every query head's vote).
Rows no longer than the budget keep every token. Chunks are cut by slot, and a whole-prompt
prefill puts position p in slot p, so slots and positions agree; the last prompt query exists
only in a whole-prompt prefill, so a chunked prefill is refused.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from ..state import LayerContext, SlotKV
from . import slots
from .base import Policy, PolicyError, check_positive
from .registry import register


def last_query(q: jax.Array, q_pos: jax.Array) -> jax.Array:
    """Each row's query at its last (highest-position) prompt token: q [B, T, Nq, H], q_pos
    [B, T] (-1 = padding) -> [B, Nq, H]."""
    idx = jnp.argmax(q_pos, axis=1)
    return jnp.take_along_axis(q, idx[:, None, None, None], axis=1)[:, 0]


def chunk_scores(k: jax.Array, pos: jax.Array, q_last: jax.Array, chunk: int) -> jax.Array:
    """Scores [B, N, C] of the C = ceil(S / chunk) slot chunks: q_last [B, Nq, H] (Nq = G N)
    against each chunk's mean key (over its slots that hold a token), averaged over the KV
    head's G query heads; -inf for a chunk without a token. k [B, N, S, H], pos [B, N, S]."""
    b, n, s, h = k.shape
    c = -(-s // chunk)
    pad = c * chunk - s
    kk = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, n, c, chunk, h)
    held = jnp.pad(pos >= 0, ((0, 0), (0, 0), (0, pad))).reshape(b, n, c, chunk)
    count = jnp.sum(held, axis=-1)
    mean_k = jnp.sum(jnp.where(held[..., None], kk, 0.0), axis=3) / jnp.maximum(count, 1)[..., None]
    qg = q_last.astype(jnp.float32).reshape(b, n, -1, h)  # [B, N, G, H]
    score = jnp.einsum("bngh,bnch->bnc", qg, mean_k) / qg.shape[2]
    return jnp.where(count > 0, score, -jnp.inf)


def chunk_counts(budget: float, chunk: int, held_chunks):
    """Chunks kept (the sink chunk included; at least 1): ceil(budget / chunk) for a token budget
    (> 1), ceil(budget * chunks holding tokens) for a fraction (<= 1). held_chunks: an int
    (a static bound) or an int array [B] (per row)."""
    if budget > 1:
        n = -(-int(budget) // chunk)
        return n if isinstance(held_chunks, int) else jnp.full(jnp.shape(held_chunks), n, jnp.int32)
    if isinstance(held_chunks, int):
        return max(1, math.ceil(held_chunks * budget - 1e-6))
    n = jnp.ceil(held_chunks.astype(jnp.float32) * jnp.float32(budget) - 1e-6).astype(jnp.int32)
    return jnp.maximum(n, 1)


def select_chunks(k, pos, q_last, budget: float, chunk: int, bound: int | None = None):
    """The retrieval rule: chunk 0 (the sinks) plus the best-scoring other chunks by
    `chunk_scores`, `chunk_counts` chunks in all per row, in slot order. bound: a static bound
    on the tokens per row (default: the slots) that sizes the result. Returns (slot indices
    [B, N, C'] int32, valid [B, N, C'] bool), C' = chunk x the most chunks a row keeps."""
    scores = chunk_scores(k, pos, q_last, chunk)
    c = scores.shape[2]
    s = pos.shape[2]
    m = min(chunk_counts(budget, chunk, -(-min(bound or s, s) // chunk)), c)
    held = jnp.sum(jnp.isfinite(scores[:, 0]), axis=-1)  # [B]: chunks holding tokens (head 0; all alike)
    keep = jnp.minimum(chunk_counts(budget, chunk, held), m)  # [B]
    scores = scores.at[:, :, 0].set(jnp.inf)  # the sink chunk is always kept
    top, chosen = jax.lax.top_k(scores, m)  # [B, N, m], best first
    use = (jnp.isfinite(top) | (chosen == 0)) & (jnp.arange(m)[None, None] < keep[:, None, None])
    chosen = jnp.sort(jnp.where(use, chosen, c), axis=2)  # unused chunks sort last
    idx = chosen[..., None] * chunk + jnp.arange(chunk, dtype=jnp.int32)  # [B, N, m, chunk]
    idx = idx.reshape(idx.shape[:2] + (m * chunk,))
    inside = idx < s
    idx = jnp.minimum(idx, s - 1).astype(jnp.int32)
    valid = inside & (jnp.take_along_axis(pos, idx, axis=2) >= 0)
    return idx, valid


@register
@dataclasses.dataclass(frozen=True)
class TriForceRetrieval(Policy):
    """budget: prompt tokens kept, in whole chunks with the sink chunk: a token count (> 1,
    ceil(budget / chunk) chunks) or a fraction of the prompt (<= 1, of the chunks holding
    tokens, per row); chunk: consecutive keys per chunk (the paper's 8). State: a `SlotKV` of
    the kept chunks' slots + max_new_tokens."""

    name = "triforce_retrieval"
    budget: float = 256
    chunk: int = 8

    def __post_init__(self):
        check_positive("chunk", self.chunk)
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0:
            raise PolicyError(f"budget={b!r} must be a fraction of the prompt in (0, 1] or a token count > 1")
        if b > 1 and b != int(b):
            raise PolicyError(f"budget={b!r} is above 1, so a token count; it must be a whole number")

    def after_prefill(self, state, q, q_pos, res, ctx: LayerContext):
        if not ctx.final or not isinstance(state, SlotKV):
            return state
        if q.shape[1] < ctx.prompt_len:
            raise PolicyError(
                f"{self.name} scores chunks with each row's last prompt query: prefill the prompt whole "
                f"(got a chunk of {q.shape[1]} tokens of a {ctx.prompt_len}-token prompt; prefill_chunk=None)"
            )
        state = super().after_prefill(state, q, q_pos, res, ctx)  # drop the padding-only slots
        idx, valid = select_chunks(
            state.k, state.pos, last_query(q, q_pos), self.budget, self.chunk, bound=ctx.prompt_bound
        )
        return slots.gather(state, idx, valid, ctx.max_new_tokens, align=True)
