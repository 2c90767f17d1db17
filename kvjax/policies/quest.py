"""Quest: every token kept, each decode step reads only the pages its query needs.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML
2024), arXiv:2406.10774. The cache is cut into pages of `page` slots; per page, per KV head and
per channel i it keeps the max M_i and min m_i of the post-RoPE keys (updated as tokens are
appended). A decode query q scores each page with

    score(page) = sum_i max(q_i * M_i, q_i * m_i)  >=  q . k   for every key k of the page,

an upper bound of its attention logits, and attention reads only K pages: the page of the
newest token (always) and the K - 1 best-scoring others. `budget` is in tokens (> 1: K =
ceil(budget / page)) or a fraction (<= 1: K = ceil(budget * pages holding tokens), per row and
KV head at every step, so the read fraction follows the growing context); K >= 1. The first
`dense_layers` layers attend densely, as in the paper. Prefill is dense (exact), and so, by
default (`question="dense"`), are the tokens of a new turn's question appended to a kept cache
(`LayerContext.new_turn`: `kvjax.Session.ask`): they are prompt, which the paper prefills densely
(its code runs every multi-token call through dense attention and only single-token decode
steps sparsely), so only the answer's tokens read a selection. `question="sparse"` selects pages
for the question's tokens too, one step per token (`benchmarks/retrieval_diag.py` shows which
layers' retrieving heads the selection misses). Ties between equal page scores go to the lower
page number (`jax.lax.top_k`'s order).

GQA (`gqa`): "max" (default) gives the G query heads of a KV head one page set, ranked by the
max of their scores, so each KV head reads K pages (one block list per KV head, the layout the
sparse decode kernel takes); "union" ranks per query head, as the paper's per-head selection
does, and reads the union of the G sets (up to G * (K - 1) + 1 pages).

Attention over the selected pages: with implementation "pallas" the sparse decode kernel reads
only the selected blocks (`pallas_kernels/sparse_decode_attention.py`; on CPU in interpret
mode); otherwise the selected pages are gathered (K * page slots) and attended exactly, so the
step reads a fraction of the cache rather than masking all of it. A budget at or above the
context selects every page: exactly dense decoding. The state holds the whole cache plus the
page bounds (2 / page of the keys' bytes more than the dense cache).

Composes as a store after a prompt-time selector: `snapkv:budget=0.5+quest:budget=256`
(the kept slots are paged as they lie, positions riding along). Refused: quest before another
policy (its state is a paged cache no store ingests; Quest over a quantized KIVI store is not
implemented), with a second store, or after a selector that evicts while decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from .. import attention
from ..pallas_kernels import _compat
from ..pallas_kernels.sparse_decode_attention import sparse_decode_attention
from ..state import LayerContext, SlotKV, leaf_nbytes, slot_bytes_used
from . import slots
from .base import Policy, PolicyError, check_positive, trim_slots
from .registry import register

GQA_MODES = ("max", "union")
QUESTION_MODES = ("dense", "sparse")


@struct.dataclass
class PagedKV:
    """A slot cache cut into pages of `page` slots plus each page's key bounds.

    kv: SlotKV [B, N, S, H] (S a multiple of page); kmax, kmin [B, N, P, H] (P = S / page):
    per-channel max / min of the page's post-RoPE keys (-inf / +inf for a page holding no
    token); static: page (slots per page), rank (pages ranked per selector head: K - 1 for the
    largest selection) and width (pages one step reads per (row, KV head))."""

    kv: SlotKV
    kmax: jax.Array
    kmin: jax.Array
    page: int = struct.field(pytree_node=False, default=16)
    rank: int = struct.field(pytree_node=False, default=0)
    width: int = struct.field(pytree_node=False, default=1)

    def nbytes_used(self) -> int:
        """Bytes of the slots holding a token (K, V, position) and of the bounds of the pages
        holding one, plus the fill counter."""
        kv = self.kv
        used = slot_bytes_used(kv.pos >= 0, [kv.k, kv.v, kv.pos], [kv.fill])
        pages = jnp.isfinite(self.kmax[..., 0].astype(jnp.float32))
        return int(used + slot_bytes_used(pages, [self.kmax, self.kmin]))

    def nbytes_read_per_step(self) -> int:
        """Bytes one decode step reads: every page's bounds (to score the pages), then `width`
        pages of K, V and positions per (row, KV head), plus the fill counter."""
        b, n, _, h = self.kv.k.shape
        per_slot = h * (self.kv.k.dtype.itemsize + self.kv.v.dtype.itemsize) + self.kv.pos.dtype.itemsize
        meta = leaf_nbytes(self.kmax) + leaf_nbytes(self.kmin) + leaf_nbytes(self.kv.fill)
        return int(meta + b * n * self.width * self.page * per_slot)


def page_bounds(kv: SlotKV, page: int):
    """Per-page, per-channel max and min of the keys of the slots holding a token:
    kmax, kmin [B, N, S / page, H] in the cache dtype (-inf / +inf for empty pages)."""
    b, n, s, h = kv.k.shape
    k = kv.k.reshape(b, n, s // page, page, h)
    valid = (kv.pos >= 0).reshape(b, n, s // page, page)[..., None]
    kmax = jnp.max(jnp.where(valid, k, -jnp.inf), axis=3).astype(kv.k.dtype)
    kmin = jnp.min(jnp.where(valid, k, jnp.inf), axis=3).astype(kv.k.dtype)
    return kmax, kmin


def page_scores(q: jax.Array, kmax: jax.Array, kmin: jax.Array) -> jax.Array:
    """Quest's page score: q [B, N, G, H], kmax / kmin [B, N, P, H] -> [B, N, G, P] float32,
    sum_i max(q_i M_i, q_i m_i) = q+ . M + q- . m; -inf for empty pages. The products are
    taken in the bounds' dtype (the cache's: the bounds are read once, not widened into a
    float32 copy; q rounded to it, as the paper's kernels compute in half precision) with
    float32 accumulation; exact for a float32 cache."""
    dt = kmax.dtype
    valid = jnp.isfinite(kmax[..., 0])  # [B, N, P]
    hi = jnp.where(valid[..., None], kmax, 0).astype(dt)
    lo = jnp.where(valid[..., None], kmin, 0).astype(dt)
    qd = q.astype(dt)
    dot = functools.partial(jnp.einsum, "bngh,bnph->bngp", precision="highest", preferred_element_type=jnp.float32)
    score = dot(jnp.maximum(qd, 0), hi) + dot(jnp.minimum(qd, 0), lo)
    return jnp.where(valid[:, :, None, :], score, -jnp.inf)


def select_pages(scores: jax.Array, current, limit: jax.Array, rank: int, width: int, mode: str):
    """Pages to read: scores [B, N, G, P] (-inf = empty page); current: the page of the newest
    token, scalar or [B] (always read); limit [B, N]: pages per (row, KV head), current
    included; rank (static): pages ranked per selector head (K - 1 of the largest K); width
    (static): pages returned. mode "max": one ranking per KV head by the max over its G heads'
    scores; "union": each query head's own top limit - 1 pages, united.

    Returns pages [B, N, width] int32 and valid [B, N, width] bool, the selected pages first
    (what the sparse decode kernel reads: the first count entries, in any order): "max" lists
    the current page, then the others by descending score (no sort beyond the top-k); "union"
    lists them in increasing page order. Ties: `jax.lax.top_k` takes the lower page number first."""
    b, n, _, p = scores.shape
    if mode == "max":
        scores = jnp.max(scores, axis=2, keepdims=True)
    g = scores.shape[2]
    current = jnp.broadcast_to(jnp.asarray(current, jnp.int32), (b,))
    others = jnp.where(jnp.arange(p) == current[:, None, None, None], -jnp.inf, scores)  # added apart
    idx = jnp.broadcast_to(current[:, None, None], (b, n, 1))
    ok = jnp.ones((b, n, 1), bool)
    if rank > 0:
        vals, top = jax.lax.top_k(others, rank)  # [B, N, g, rank], descending
        # valid entries form a prefix: the first limit - 1, and -inf (empty pages) sorts last
        top_ok = (jnp.arange(rank) < (limit - 1)[:, :, None, None]) & jnp.isfinite(vals)
        idx = jnp.concatenate([idx, top.reshape(b, n, g * rank).astype(jnp.int32)], axis=2)
        ok = jnp.concatenate([ok, top_ok.reshape(b, n, g * rank)], axis=2)
    if g == 1:  # distinct, and the selected ones already first: the current page, then the top-k
        return idx[..., :width], ok[..., :width]
    # union: a page mask [B, N, P], then its first `width` set pages in increasing order
    mask = jax.vmap(jax.vmap(lambda i, o: jnp.zeros((p,), bool).at[i].max(o)))(idx, ok)
    _, pages = jax.lax.top_k(jnp.where(mask, (p - jnp.arange(p)).astype(jnp.float32), 0.0), width)
    return pages.astype(jnp.int32), jnp.take_along_axis(mask, pages, axis=2)


def gather_pages(kv: SlotKV, pages: jax.Array, valid: jax.Array, page: int):
    """k, v [B, N, W * page, H] and positions [B, N, W * page] (-1 outside valid pages) of the
    selected pages [B, N, W]."""
    slot = (pages[..., None] * page + jnp.arange(page)).reshape(pages.shape[:2] + (-1,))
    ok = jnp.repeat(valid, page, axis=2)
    k = jnp.take_along_axis(kv.k, slot[..., None], axis=2)
    v = jnp.take_along_axis(kv.v, slot[..., None], axis=2)
    pos = jnp.where(ok, jnp.take_along_axis(kv.pos, slot, axis=2), -1)
    return k, v, pos


def kernel_backend_for(page: int, head_dim: int) -> tuple[str, bool]:
    """(sparse decode kernel backend, interpret) for this device; raises PolicyError when the
    kernel cannot take pages of `page` slots or this head_dim there."""
    backend = _compat.backend_kind()
    interpret = backend == "reference"  # CPU: the Triton kernel in interpret mode
    if interpret or backend == "mosaic_gpu":
        backend = "triton"
    if backend == "triton":
        for name, val in (("page", page), ("head_dim", head_dim)):
            if val < 16 or val & (val - 1):
                raise PolicyError(
                    f"quest: {name}={val} cannot be read by the sparse decode kernel on this backend (triton"
                    f"{', interpreted' if interpret else ''}): it takes powers of two >= 16; use page=16, 32 or 64, "
                    "or implementation='reference' (gathered pages)"
                )
    elif backend == "mosaic_tpu" and page % 8:
        raise PolicyError(
            f"quest: page={page} cannot be read by the TPU sparse decode kernel: it takes multiples of 8 slots; "
            "use page=16, or implementation='reference'"
        )
    return backend, interpret


@register
@dataclasses.dataclass(frozen=True)
class Quest(Policy):
    """budget: what a decode step reads, as tokens (> 1, a whole number) or a fraction of the
    pages holding tokens (<= 1); page: slots per page; dense_layers: first layers read densely;
    gqa: "max" (one page set per KV head) or "union" (each query head's own set, united);
    question: how a new turn's question tokens attend (`LayerContext.new_turn`, set by
    `kvjax.Session.ask`): "dense" (every slot, as the paper's prefill) or "sparse" (selected
    pages, like answer tokens)."""

    name = "quest"
    budget: float = 0.125
    page: int = 16
    dense_layers: int = 2
    gqa: str = "max"
    question: str = "dense"

    stores_slots: ClassVar[bool] = True
    feeds_stores: ClassVar[bool] = False
    feeds_stores_note: ClassVar[str] = (
        "a paged cache with per-page key bounds; Quest over a quantized store is not implemented: "
        "put quest last, e.g. 'snapkv:budget=0.5+quest:budget=256'"
    )
    retrieves: ClassVar[bool] = True

    def __post_init__(self):
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not b > 0:
            raise PolicyError(f"quest: budget={b!r} must be a fraction of the context in (0, 1] or a token count > 1")
        if b > 1 and b != int(b):
            raise PolicyError(f"quest: budget={b!r} is above 1, so a token count; it must be a whole number")
        check_positive("page", self.page)
        check_positive("dense_layers", self.dense_layers, 0)
        if self.gqa not in GQA_MODES:
            raise PolicyError(f"quest: gqa={self.gqa!r}; expected one of {GQA_MODES}")
        if self.question not in QUESTION_MODES:
            raise PolicyError(f"quest: question={self.question!r}; expected one of {QUESTION_MODES}")

    # ---- sizes --------------------------------------------------------------------------
    def validate(self, prompt_len, config):
        if self.dense_layers >= config.num_layers:
            raise PolicyError(
                f"quest: dense_layers={self.dense_layers} leaves no sparse layer in {config.name!r} "
                f"({config.num_layers} layers); use the dense policy, or fewer dense layers"
            )

    def prefill_capacity(self, prompt_len, max_new_tokens):
        return -(-(prompt_len + max_new_tokens) // self.page) * self.page

    def pages_for(self, valid_pages):
        """K: pages a step reads (current page included) when `valid_pages` pages hold tokens
        (an int, or an int32 array of per-(row, head) counts): ceil(budget / page) for a token
        budget, ceil(budget * valid_pages) for a fraction; at least 1."""
        if self.budget > 1:
            n = -(-int(self.budget) // self.page)
            return n if isinstance(valid_pages, int) else jnp.full(jnp.shape(valid_pages), n, jnp.int32)
        if isinstance(valid_pages, int):
            return max(1, math.ceil(valid_pages * self.budget - 1e-6))
        n = jnp.ceil(valid_pages.astype(jnp.float32) * jnp.float32(self.budget) - 1e-6).astype(jnp.int32)
        return jnp.maximum(n, 1)

    def selection(self, num_pages: int, group: int) -> tuple[int, int]:
        """Static (rank, width) for a cache of `num_pages` pages: pages ranked per selector head
        (K - 1 of the largest K any row gets), and pages one step reads per (row, KV head): K
        ("max"), or G * (K - 1) + 1 ("union"), at most num_pages."""
        k = min(self.pages_for(num_pages), num_pages)
        width = k if self.gqa == "max" else min(group * (k - 1) + 1, num_pages)
        return k - 1, width

    def sparse(self, layer: int) -> bool:
        return layer >= self.dense_layers

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        kv = SlotKV.empty(
            batch, config.num_kv_heads, self.prefill_capacity(prompt_len, max_new_tokens), config.head_dim, dtype
        )
        return self._paged(kv, config) if self.sparse(layer) else kv

    def _paged(self, kv: SlotKV, config) -> PagedKV:
        """A paged state over `kv`: page bounds from its tokens, static selection sizes."""
        kmax, kmin = page_bounds(kv, self.page)
        rank, width = self.selection(kv.capacity // self.page, config.group_size)
        return PagedKV(kv, kmax, kmin, self.page, rank, width)

    # ---- prefill: dense and exact; page bounds at the end of the prompt ----------------------
    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        kv = slots.append(state.kv if isinstance(state, PagedKV) else state, k, v, q_pos)
        res = self.attend(kv, q, q_pos, ctx)
        if not ctx.final:
            return (state.replace(kv=kv) if isinstance(state, PagedKV) else kv), res.out
        bound = ctx.prompt_bound
        kv = trim_slots(kv, self.prefill_capacity(bound, ctx.max_new_tokens), bound)
        if not self.sparse(ctx.layer):
            return kv, res.out
        # each row decodes right after its own prompt (per-row write offsets), so its pages are
        # the same alone or next to longer rows
        return self._paged(kv.replace(fill=slots.row_lengths(kv.pos)), ctx.config), res.out

    def ingest(self, slots_state: SlotKV, ctx: LayerContext):
        """Page another policy's kept slots [B, N, C, H] as they lie (positions per slot), with
        room for ctx.max_new_tokens more; a budget fraction counts the pages holding kept tokens."""
        c = slots_state.capacity
        pad = self.prefill_capacity(c, ctx.max_new_tokens) - c
        kv = SlotKV(
            k=jnp.pad(slots_state.k, ((0, 0), (0, 0), (0, pad), (0, 0))),
            v=jnp.pad(slots_state.v, ((0, 0), (0, 0), (0, pad), (0, 0))),
            pos=jnp.pad(slots_state.pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1),
            fill=jnp.asarray(c, jnp.int32),
        )
        if not self.sparse(ctx.layer):
            return kv
        kept = jnp.max(jnp.sum(slots_state.pos >= 0, axis=2), axis=1).astype(jnp.int32)  # kept slots come first
        return self._paged(kv.replace(fill=kept), ctx.config)

    # ---- decode: score the pages, read the selected ones --------------------------------------
    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, PagedKV):  # a dense layer
            return super().decode(state, q, k, v, q_pos, ctx)
        outs = []
        for i in range(q.shape[1]):  # several new tokens: one step each, in order
            state, out = self._step(state, q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], q_pos[:, i : i + 1], ctx)
            outs.append(out)
        return state, jnp.concatenate(outs, axis=1)

    def _step(self, state: PagedKV, q, k, v, q_pos, ctx: LayerContext):
        """Append one token (page bounds updated), then attend: over every slot for a new turn's
        question under question="dense", else over the selected pages."""
        kv = state.kv
        b, n, _, h = state.kmax.shape
        slot = jnp.minimum(kv.fill, kv.capacity - 1)  # where `append` writes (scalar, or [B] per row)
        kv = slots.append(kv, k, v, q_pos)
        cur = slot // self.page  # the page of the newest token
        at = jnp.broadcast_to(jnp.reshape(cur, (-1, 1, 1, 1)), (b, n, 1, h))
        new = jnp.swapaxes(k, 1, 2).astype(state.kmax.dtype)  # [B, N, 1, H]
        ok = (q_pos[:, 0] >= 0)[:, None, None, None]
        hi, lo = jnp.take_along_axis(state.kmax, at, axis=2), jnp.take_along_axis(state.kmin, at, axis=2)
        kmax = slots.write_rows(state.kmax, jnp.where(ok, jnp.maximum(hi, new), hi), cur)
        kmin = slots.write_rows(state.kmin, jnp.where(ok, jnp.minimum(lo, new), lo), cur)
        kmax, kmin = jax.lax.optimization_barrier((kmax, kmin))  # written before the scores read them
        state = state.replace(kv=kv, kmax=kmax, kmin=kmin)
        if ctx.new_turn and self.question == "dense":  # the question is prompt: read it all
            return state, self.attend(kv, q, q_pos, ctx).out
        scores = page_scores(q[:, 0].reshape(b, n, -1, h), kmax, kmin)
        limit = self.pages_for(jnp.sum(jnp.isfinite(scores[:, :, 0]), axis=2, dtype=jnp.int32))  # [B, N]
        pages, valid = select_pages(scores, cur, limit, state.rank, state.width, self.gqa)
        return state, self.attend_pages(kv, q, q_pos, pages, valid, ctx)

    def truncate_layer(self, layer, lengths):
        """Roll back to per-row lengths [B]: the slots of later positions are emptied
        (`slots.truncate_slots`) and the page bounds recomputed from what stays."""
        if not isinstance(layer, PagedKV):
            return super().truncate_layer(layer, lengths)
        kv = slots.truncate_slots(layer.kv, lengths)
        kmax, kmin = page_bounds(kv, self.page)
        return layer.replace(kv=kv, kmax=kmax, kmin=kmin)

    def attend_pages(self, kv: SlotKV, q, q_pos, pages, valid, ctx: LayerContext):
        """Exact attention of q [B, 1, Nq, H] over the selected pages [B, N, W] only."""
        impl = attention.resolve_implementation(ctx.implementation)
        window = ctx.config.sliding_window
        if impl == "pallas":
            backend, interpret = kernel_backend_for(self.page, q.shape[-1])
            out, _ = sparse_decode_attention(
                q,
                kv.k,
                kv.v,
                pages,
                jnp.full(kv.pos.shape[:2], kv.capacity, jnp.int32),
                block_size=self.page,
                block_counts=jnp.sum(valid, axis=2, dtype=jnp.int32),
                k_pos=kv.pos,
                q_pos=q_pos,
                window=window,
                selection_is_clean=True,  # distinct, in range, selected ones first
                backend=backend,
                interpret=interpret,
            )
            return out
        k, v, pos = gather_pages(kv, pages, valid, self.page)
        return attention.attend(
            q, k.astype(q.dtype), v.astype(q.dtype), q_pos, pos, window=window, implementation=ctx.implementation
        ).out
