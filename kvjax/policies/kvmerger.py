"""KVMerger: adaptive KV merging by key similarity with Gaussian-kernel weights.

Wang et al., "Model Tells You Where to Merge: Adaptive KV Cache Merging for LLMs on
Long-Context Tasks" (2024), arXiv:2407.08454. After the prompt (per layer and KV head):

1. Merging sets: consecutive tokens whose keys have cosine similarity >= `threshold` with
   their predecessor form one set (key states are similar at the token level within a
   sequence, mostly between neighbours); the `window` most recent tokens are never merged.
   At most length - floor(budget * length) such links are made per KV head, the most similar
   first: on SmolLM2 the paper's 0.8 links nearly every pair in middle layers (2-3% of the
   tokens would stay distinct in layer 15 of a 2k prompt), which erased the prompt at any
   budget; the cap merges no more than the budget requires.
2. Each set is merged onto its pivot, the member with the largest accumulated attention
   (the attention mass it received from all prompt queries, as H2O accumulates it):
   w_i = exp(-||k_p - k_i||^2 / (2 sigma^2)), k_p <- sum w_i k_i / sum w_i and
   v_p <- sum w_i v_i / sum w_i. sigma^2 is the set's mean squared key distance to its
   pivot (the kernel's bandwidth adapts to the set; the pivot has weight 1).
3. Tokens outside any merging set are handled like H2O heavy hitters: every unit (a merged
   set, represented by its pivot, or an unmerged token) is ranked by accumulated attention
   and, beyond floor(budget * length) units (recent window included), the lightest go.

The result is a smaller `SlotKV` (budget slots + decode headroom); decoding appends.
Per row (true length L): at least `window` units are kept (the recent window is never
merged), so a row of at most `window` tokens is kept whole.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..state import LayerContext, SlotKV
from . import slots
from .base import PolicyError, check_positive
from .elastic_cache import merge_onto, position_order, take
from .eviction import EvictionPolicy, ScoredKV
from .registry import register

_BIG = 2.0**23  # above any accumulated attention mass; BIG + position stays exact in float32


def merging_sets(k: jax.Array, mergeable: jax.Array, threshold: float, max_links: jax.Array | None = None) -> jax.Array:
    """Set ids [B, N, S] for position-ordered keys k [B, N, S, H]: slot i joins slot i-1's
    set when both are mergeable and cos(k_i, k_{i-1}) >= threshold; ids count up from 0.
    max_links [B] or [B, N]: at most that many links per (row, head), the most similar pairs
    first (earlier pairs on ties), so merging never leaves fewer units than the budget keeps."""
    kf = k.astype(jnp.float32)
    kn = kf / jnp.maximum(jnp.linalg.norm(kf, axis=-1, keepdims=True), 1e-12)
    sim = jnp.sum(kn[:, :, 1:] * kn[:, :, :-1], axis=-1)
    link = mergeable[:, :, 1:] & mergeable[:, :, :-1] & (sim >= threshold)
    if max_links is not None:
        cap = max_links[:, None] if max_links.ndim == 1 else max_links
        order = jnp.argsort(jnp.where(link, -sim, jnp.inf), axis=-1, stable=True)
        rank = jnp.argsort(order, axis=-1, stable=True)
        link &= rank < cap[..., None]
    link = jnp.pad(link, ((0, 0), (0, 0), (1, 0)))
    return jnp.cumsum(~link, axis=2).astype(jnp.int32) - 1


def gaussian_merge(kv: SlotKV, set_id: jax.Array, score: jax.Array):
    """Merge every set onto its pivot (largest `score`, first on ties) with Gaussian-kernel
    weights (see module doc). kv [B, N, S, H]; set_id, score [B, N, S] (slots in position
    order, empty slots last). Returns (merged SlotKV, is_pivot [B, N, S] bool)."""
    b, n, s, _ = kv.k.shape
    seg = (jnp.arange(b * n, dtype=jnp.int32).reshape(b, n, 1) * s + set_id).reshape(-1)
    ns = b * n * s
    valid = kv.pos >= 0
    sc = jnp.where(valid, score.astype(jnp.float32), -jnp.inf).reshape(-1)
    top = jax.ops.segment_max(sc, seg, num_segments=ns)[seg]
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, n, s)).reshape(-1)
    pivot = jax.ops.segment_min(jnp.where(sc >= top, idx, s), seg, num_segments=ns)[seg].reshape(b, n, s)
    pivot = jnp.minimum(pivot, s - 1)
    kf = kv.k.astype(jnp.float32)
    d = jnp.sum((kf - take(kf, pivot)) ** 2, axis=-1)  # [B, N, S]
    d = jnp.where(valid, d, 0.0)
    count = jax.ops.segment_sum(valid.reshape(-1).astype(jnp.float32), seg, num_segments=ns)[seg]
    sigma2 = (jax.ops.segment_sum(d.reshape(-1), seg, num_segments=ns)[seg] / jnp.maximum(count - 1, 1)).reshape(
        b, n, s
    )
    w = jnp.where(sigma2 > 0, jnp.exp(-d / (2 * jnp.where(sigma2 > 0, sigma2, 1.0))), 1.0)
    k, v, _ = merge_onto(kv, pivot, jnp.where(valid, w, 0.0))
    is_pivot = valid & (pivot == jnp.arange(s)[None, None])
    return kv.replace(k=k, v=v), is_pivot


@register
@dataclasses.dataclass(frozen=True)
class KVMerger(EvictionPolicy):
    """budget: fraction of the prompt kept (merged units); threshold: cosine similarity of
    consecutive keys that puts them in one merging set; window: recent tokens kept as is."""

    name = "kvmerger"
    budget: float = 0.2
    threshold: float = 0.8
    window: int = 32

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.threshold, (int, float)) and -1.0 < self.threshold <= 1.0):
            raise PolicyError(f"threshold={self.threshold!r} must be a cosine similarity in (-1, 1]")
        check_positive("window", self.window, 0)

    def keep_floor(self) -> int:
        return max(1, self.window)

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        kv = SlotKV.empty(batch, config.num_kv_heads, prompt_len, config.head_dim, dtype)
        return ScoredKV(kv, jnp.zeros(kv.pos.shape, jnp.float32), jnp.zeros(kv.pos.shape[:2], jnp.int32))

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        """Append a chunk, attend, accumulate per-head attention mass; merge after the final
        chunk. state: ScoredKV (score = accumulated mass per KV head)."""
        kv = slots.append(state.kv, k, v, q_pos)
        res = self.attend(kv, q, q_pos, ctx, want_mass=True)
        st = ScoredKV(kv, state.score + res.key_mass.astype(jnp.float32), state.limit)
        return (self.compress(st, ctx) if ctx.final else st), res.out

    def compress(self, state, ctx: LayerContext, **observations):
        """Merging sets -> Gaussian merge onto pivots -> keep the heaviest units.
        Returns SlotKV [B, N, C + max_new_tokens, H]."""
        order = position_order(state.kv.pos)
        kv = SlotKV(take(state.kv.k, order), take(state.kv.v, order), take(state.kv.pos, order), state.kv.fill)
        mass = take(state.score, order)
        lengths = slots.row_lengths(kv.pos)
        recent = (kv.pos >= 0) & (kv.pos >= lengths[:, None, None] - self.window)
        keep = self.keep_counts(lengths, ctx)
        set_id = merging_sets(kv.k, (kv.pos >= 0) & ~recent, self.threshold, max_links=lengths - keep)
        merged, is_pivot = gaussian_merge(kv, set_id, mass)
        units = kv.replace(pos=jnp.where(is_pivot, kv.pos, -1))
        scores = jnp.where(recent, _BIG + kv.pos, mass)  # newest first among the window
        idx, valid = slots.select_indices(units, scores, keep, min(self.capacity(ctx.prompt_bound, ctx), kv.capacity))
        return slots.gather(merged, idx, valid, ctx.max_new_tokens, align=True)
