"""Block offload for sessions (ReKV / InfLLM style): old blocks in host memory, fetched per question.

ReKV (Di et al., "Streaming Video Question-Answering with In-context Video KV-Cache
Retrieval", ICLR 2025, arXiv:2503.00540) keeps a long context's KV cache outside the device
and, when a question arrives, retrieves the blocks whose mean key is most similar to the
question's mean query; InfLLM (Xiao et al. 2024) cuts text into blocks with representative
keys the same way. Here, for text: after the prompt is prefilled (exactly, `HostKV` below),
each layer keeps on the device

    sinks    the first `sinks` tokens                       SlotKV (with the window)
    window   the most recent >= `window` tokens (from a block boundary) + decode room
    got      the `topk` retrieved blocks (K, V, positions)  [B, N, topk * block, H]
    reps     each old block's mean post-RoPE key          [B, N, P, H]

and in host memory (`kvjax.host`) the prompt's post-RoPE K and V in blocks of `block` tokens
[B, N, P * block, H]. When a new question arrives (`LayerContext.new_turn`: `kvjax.Session.ask`
sets it) each layer chooses `topk` of the blocks that lie wholly before the window, fetches
their K and V from host memory, and the answer's tokens attend over [sinks | retrieved blocks |
window | question and answer tokens], merged through their log-sum-exps. Two settings decide
how the question itself attends and how the blocks are chosen:

    question="dense" (default)  the question's tokens attend over every token of the context:
                                 [sinks | window | question] plus every retrievable block, read
                                 from the store one block at a time (`attend_all`). A new turn
                                 therefore copies every block's K and V from host memory once
                                 (`nbytes_host_read_per_turn` counts them), besides the
                                 retrieved blocks; decode steps after it read only the device.
    question="sparse"            the question attends like its answer, over the retrieved
                                 blocks only (ReKV: retrieve for the question, then answer).
    select="auto" (default)      "attention" under question="dense", "cosine" under "sparse".
    select="attention"           a block's score is the softmax attention mass the question's
                                 own queries put on its tokens during that dense pass, summed
                                 over the question's tokens and the G query heads of each KV
                                 head, per layer; each KV head retrieves its own top `topk`
                                 blocks (`got` holds positions per head). Needs question="dense".
    select="cosine"              ReKV's rule: the cosine similarity of each block's mean key
                                 (all KV heads' channels concatenated) with the question's mean
                                 query (its tokens' queries averaged, each query head's group
                                 onto its KV head), one block set shared by the KV heads.

`question="sparse"` (select "auto" = "cosine") is the paper's method. The defaults deviate from it: on
SmolLM2, for a passkey asked after the context, the mean-key cosine ranks the needle's block far
below the top `topk` in the layers that retrieve it, while those layers' question queries put
their attention on the needle's tokens (`benchmarks/retrieval_diag.py`; numbers in
docs/methods.md). A question that reads every block once is the price (as Quest's and
ShadowKV's dense question, `kvjax.policies.quest`, `kvjax.policies.shadowkv`).

Without a question (`kvjax.generate`: the question is inside the prompt) the prompt's last
`block` queries stand for it at the end of the prefill (their attention over the whole prompt,
one more read of every block, under select="attention"). Positions ride along, so a retrieved
block attends at its true positions; a block's tokens that are also sinks are masked in it.
Decode steps that are not a new turn append to the window, which has room for the question,
the answer and history (no block leaves the device while decoding, so the host leaves are
read-only and loop-invariant in the decode loop).

ReKV encodes its video stream with sliding-window attention; here the prompt is prefilled with
exact causal attention. A top-k covering every block retrieves the whole context: exactly dense
decoding. Chunked
prefill (`prefill_chunk=C`, C a multiple of `block`) writes each chunk's K/V to host memory
and attends over the earlier chunks block by block from there (`HostKV`), so the prompt's
full K/V never sits on the device at once. `offload`: "auto" (host memory where the backend
has it, else the device: the fallback), "host" (an error without it) or "device".

`HostKV` and `prefill_step` are shared with ShadowKV (`kvjax.policies.shadowkv`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from .. import attention, host
from ..state import LayerContext, SlotKV, leaf_nbytes, leaves_nbytes, slot_bytes_used
from . import slots
from .base import Policy, PolicyError, check_positive
from .registry import register

#: How a new turn's question tokens attend (`Offload.question`) and how blocks are chosen (`Offload.select`).
QUESTION_MODES = ("dense", "sparse")
SELECT_MODES = ("auto", "attention", "cosine")

# ---- the prompt's K/V while it is prefilled ------------------------------------------------


@struct.dataclass
class HostKV:
    """A prompt's post-RoPE K and V while it is prefilled: k, v [B, N, S, H] (in host memory
    when `on_host`), slot = position (a right-padded prompt); seen [B] int32: tokens of each row
    so far; fill: slots written (scalar)."""

    k: jax.Array
    v: jax.Array
    seen: jax.Array
    fill: jax.Array
    on_host: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def empty(cls, batch, num_kv_heads, capacity, head_dim, dtype, on_host: bool) -> HostKV:
        shape = (batch, num_kv_heads, capacity, head_dim)
        make = host.zeros if on_host else jnp.zeros
        k, v = make(shape, dtype), make(shape, dtype)
        return cls(k, v, jnp.zeros((batch,), jnp.int32), jnp.zeros((), jnp.int32), on_host)

    def nbytes_host(self) -> int:
        return leaf_nbytes(self.k) + leaf_nbytes(self.v) if self.on_host else 0


def attend_segments(q, q_pos, segments, ctx: LayerContext, prefix_cache: bool = False):
    """Exact attention of q [B, T, Nq, H] over disjoint slot sets (k, v [B, N, S, H], k_pos
    [B, N, S]) merged through their log-sum-exps: (out [B, T, Nq, H], lse [B, T, Nq])."""
    outs, lses = [], []
    for k, v, pos in segments:
        r = attention.attend(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            q_pos,
            pos,
            window=ctx.config.sliding_window,
            implementation=ctx.implementation,
            prefix_cache=prefix_cache,
        )
        outs.append(r.out)
        lses.append(r.lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return attention.merge_partials(outs, lses)


def check_chunk(who: str, t: int, capacity: int, multiple: int, what: str) -> None:
    """A prefill chunk of t tokens into a store of `capacity` slots must be whole multiples."""
    if t != capacity and (capacity % t or t % multiple):
        raise PolicyError(
            f"{who}: a prefill chunk of {t} tokens must divide the prompt bucket ({capacity}) and be a multiple "
            f"of {what}={multiple}; use prefill_chunk = a multiple of {multiple} that divides the bucket"
        )


def prefill_step(store: HostKV, q, k, v, q_pos, ctx: LayerContext, keep_k: bool = True):
    """One prompt chunk (q [B, T, Nq, H], k, v [B, T, N, H] post-RoPE, q_pos [B, T]) into the
    store, attended exactly: over the chunk itself (causal by position) and, chunk by chunk,
    over the earlier slots read back from the store (`host.slice_tokens`: one chunk of K/V on
    the device at a time), merged through their log-sum-exps. A chunk that is the whole prompt
    (T = S) is attended alone and not written (the caller builds its state from it);
    keep_k=False skips writing K (a caller that keeps only V). Returns (store, out)."""
    b, t = q_pos.shape
    n, s = store.k.shape[1], store.k.shape[2]
    kk, vv = slots.to_heads_major(k), slots.to_heads_major(v)
    own_pos = jnp.broadcast_to(q_pos[:, None, :], (b, n, t)).astype(jnp.int32)
    whole = t == s
    out, lse = attend_segments(q, q_pos, [(kk, vv, own_pos)], ctx, prefix_cache=whole and ctx.prefix_cache)
    seen = jnp.maximum(store.seen, jnp.max(q_pos, axis=1) + 1).astype(jnp.int32)
    if whole:
        return store.replace(seen=seen, fill=store.fill + t), out
    start = store.fill

    def earlier(j, acc):
        o, l = acc
        at = j * t
        slot = at + jnp.arange(t, dtype=jnp.int32)
        pos = jnp.where(slot[None, :] < store.seen[:, None], slot[None, :], -1)
        blk = (
            host.slice_tokens(store.k, at, t),
            host.slice_tokens(store.v, at, t),
            jnp.broadcast_to(pos[:, None, :], (b, n, t)),
        )
        o2, l2 = attend_segments(q, q_pos, [blk], ctx)
        return attention.merge_partials([o, o2.astype(jnp.float32)], [l, l2])

    out, lse = jax.lax.fori_loop(0, start // t, earlier, (out.astype(jnp.float32), lse))
    k_buf = host.write(store.k, kk, start) if keep_k else store.k
    v_buf = host.write(store.v, vv, start)
    return store.replace(k=k_buf, v=v_buf, seen=seen, fill=start + t), out.astype(q.dtype)


def token_blocks(source: jax.Array, t: int):
    """Read a [B, N, S, H] leaf (host or device) in blocks of t tokens: a function j -> block."""
    return lambda j: host.slice_tokens(source, j * t, t)


def gather_tokens(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x [B, N, S, H] (host or device) at token rows [B, N, K] (clipped into range) -> device
    [B, N, K, H]."""
    rows = jnp.clip(rows, 0, x.shape[2] - 1)
    return host.take_along_axis(x, rows[..., None], axis=2)


# ---- the policy --------------------------------------------------------------------------------


@struct.dataclass
class OffloadPrefill:
    """The offload policy's state while its prompt is prefilled: the K/V store and each row's
    last `block` queries qbuf [B, block, Nq, H] float32 at positions qpos [B, block] (-1 = none),
    the question stand-in at the end of the prompt."""

    kv: HostKV
    qbuf: jax.Array
    qpos: jax.Array

    def nbytes_host(self) -> int:
        return self.kv.nbytes_host()


@struct.dataclass
class OffloadKV:
    """The offload policy's decode state (module doc). local: SlotKV of sinks + window + decode
    room; got: SlotKV of the retrieved blocks [B, N, topk * block, H]; k, v [B, N, P * block, H]
    the prompt's blocks (host memory when `on_host`); reps [B, N, P, H] float32 their mean keys;
    ok [B, P] bool: blocks a question may retrieve (wholly before the window, not only sinks);
    sink_end [B] int32: positions below it are in `local`; dense_turn: a new turn's question
    reads every block (question="dense")."""

    local: SlotKV
    got: SlotKV
    k: jax.Array
    v: jax.Array
    reps: jax.Array
    ok: jax.Array
    sink_end: jax.Array
    block: int = struct.field(pytree_node=False, default=64)
    on_host: bool = struct.field(pytree_node=False, default=False)
    dense_turn: bool = struct.field(pytree_node=False, default=False)

    def nbytes_host(self) -> int:
        """The prompt's blocks when they are in host memory."""
        return leaf_nbytes(self.k) + leaf_nbytes(self.v) if self.on_host else 0

    def nbytes_used(self) -> int:
        """Filled slots of the device buffers, the blocks, their representatives and flags."""
        local = slot_bytes_used(self.local.pos >= 0, [self.local.k, self.local.v, self.local.pos], [self.local.fill])
        got = slot_bytes_used(self.got.pos >= 0, [self.got.k, self.got.v, self.got.pos], [self.got.fill])
        rest = leaves_nbytes((self.k, self.v, self.reps, self.ok, self.sink_end))
        return int(local + got + rest)

    def nbytes_read_per_step(self) -> int:
        """One decode step that is not a new turn reads the device buffers (sinks, window,
        retrieved blocks): no block representative and nothing from host memory."""
        return leaves_nbytes((self.local, self.got))

    def nbytes_host_read_per_step(self) -> int:
        return 0

    def nbytes_host_read_per_turn(self) -> int:
        """Bytes a new turn copies from the block store (host memory when `on_host`): the
        retrieved blocks' K and V, and with `dense_turn` every block's K and V once more (the
        question attends over all of them)."""
        every = leaf_nbytes(self.k) + leaf_nbytes(self.v) if self.dense_turn else 0
        return int(leaves_nbytes((self.got.k, self.got.v)) + every)


@register
@dataclasses.dataclass(frozen=True)
class Offload(Policy):
    """window: recent tokens kept on the device (from a block boundary, so up to window + block
    - 1); block: tokens per offloaded block; topk: blocks a question retrieves (per KV head
    under select="attention"); sinks: first tokens kept on the device; offload: where the blocks
    live ("auto", "host", "device"); question: how a new turn's question attends ("dense": every
    block, "sparse": the retrieved ones); select: how blocks are scored ("attention": the
    question's attention mass, "cosine": ReKV's mean-key cosine, "auto": attention under the
    dense question, else cosine). Module doc."""

    name = "offload"
    window: int = 256
    block: int = 64
    topk: int = 8
    sinks: int = 4
    offload: str = "auto"
    question: str = "dense"
    select: str = "auto"

    feeds_stores: ClassVar[bool] = False
    feeds_stores_note: ClassVar[str] = "blocks in host memory with mean-key representatives"
    retrieves: ClassVar[bool] = True
    #: T tokens appended in one decode call equal T single steps (the retrieved set changes only
    #: on a new turn), and padding columns (position -1) are skipped.
    appends_like_dense: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("window", self.window)
        check_positive("block", self.block)
        check_positive("topk", self.topk)
        check_positive("sinks", self.sinks, 0)
        if self.offload not in host.OFFLOAD_CHOICES:
            raise PolicyError(f"offload: offload={self.offload!r}; expected one of {host.OFFLOAD_CHOICES}")
        if self.question not in QUESTION_MODES:
            raise PolicyError(f"offload: question={self.question!r}; expected one of {QUESTION_MODES}")
        if self.select not in SELECT_MODES:
            raise PolicyError(f"offload: select={self.select!r}; expected one of {SELECT_MODES}")
        if self.selection == "attention" and self.question != "dense":
            raise PolicyError(
                f"offload: select='attention' scores blocks by the question's attention over every block, "
                f"which needs question='dense' (got question={self.question!r}); use select='cosine'"
            )

    @property
    def selection(self) -> str:
        """The block score in use: `select`, with "auto" resolved by `question`."""
        if self.select == "auto":
            return "attention" if self.question == "dense" else "cosine"
        return self.select

    def on_host(self) -> bool:
        try:
            return host.placement(self.offload, self.name)
        except ValueError as e:
            raise PolicyError(str(e)) from None

    def validate(self, prompt_len, config):
        self.on_host()
        if prompt_len % self.block and prompt_len > self.block:
            raise PolicyError(
                f"offload: block={self.block} must divide the prompt bucket {prompt_len}; use a power of two"
            )

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        kv = HostKV.empty(batch, config.num_kv_heads, prompt_len, config.head_dim, dtype, self.on_host())
        qbuf = jnp.zeros((batch, self.block, config.num_heads, config.head_dim), jnp.float32)
        return OffloadPrefill(kv, qbuf, jnp.full((batch, self.block), -1, jnp.int32))

    # ---- prefill -------------------------------------------------------------------------------
    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, OffloadPrefill):
            raise PolicyError("offload: a prompt is prefilled into the state init_layer gives (not after decoding)")
        t = q_pos.shape[1]
        check_chunk(self.name, t, state.kv.k.shape[2], self.block, "block")
        kv, out = prefill_step(state.kv, q, k, v, q_pos, ctx)
        qbuf, qpos = self._last_queries(state, q, q_pos, ctx)
        state = OffloadPrefill(kv, qbuf, qpos)
        if not ctx.final:
            return state, out
        src = (slots.to_heads_major(k), slots.to_heads_major(v)) if t == kv.k.shape[2] else (kv.k, kv.v)
        return self._build(state, src, t, ctx), out

    def _last_queries(self, state: OffloadPrefill, q, q_pos, ctx):
        """Each row's last `block` queries so far ([B, block, Nq, H], positions [B, block])."""
        allq = jnp.concatenate([state.qbuf, q.astype(jnp.float32)], axis=1)
        allp = jnp.concatenate([state.qpos, q_pos.astype(jnp.int32)], axis=1)
        _, idx = jax.lax.top_k(allp, self.block)  # the newest positions (-1s last)
        return jnp.take_along_axis(allq, idx[:, :, None, None], axis=1), jnp.take_along_axis(allp, idx, axis=1)

    def _build(self, state: OffloadPrefill, src, t: int, ctx: LayerContext) -> OffloadKV:
        kv = state.kv
        b, n, s, h = kv.k.shape
        blk = self.block
        bound = min(ctx.prompt_bound or s, s)
        length = kv.seen
        win_start = jnp.maximum(0, (length - self.window) // blk * blk)
        sink_end = jnp.minimum(self.sinks, win_start)
        # sinks + window on the device, with room for the turns to come
        width = min(bound, self.sinks + self.window + blk - 1)
        r = jnp.arange(width, dtype=jnp.int32)[None, :]
        pos = jnp.where(r < sink_end[:, None], r, win_start[:, None] + r - sink_end[:, None])
        pos = jnp.where(pos < length[:, None], pos, -1)
        rows = jnp.broadcast_to(jnp.maximum(pos, 0)[:, None, :], (b, n, width))
        kpos = jnp.broadcast_to(pos[:, None, :], (b, n, width))
        fill = (sink_end + length - win_start).astype(jnp.int32)
        local = SlotKV(
            k=jnp.pad(gather_tokens(src[0], rows), ((0, 0), (0, 0), (0, ctx.max_new_tokens), (0, 0))),
            v=jnp.pad(gather_tokens(src[1], rows), ((0, 0), (0, 0), (0, ctx.max_new_tokens), (0, 0))),
            pos=jnp.pad(kpos, ((0, 0), (0, 0), (0, ctx.max_new_tokens)), constant_values=-1),
            fill=fill,
        )
        # the blocks: every whole block below the bound, in host memory (one empty block when the
        # bound holds none: every token is a sink or in the window then)
        p = bound // blk
        if p:
            reps = self._block_means(src[0], t, p * blk, n, h)
            kb, vb = host.prefix(src[0], p * blk), host.prefix(src[1], p * blk)
        else:
            p = 1
            reps = jnp.zeros((b, n, 1, h), jnp.float32)
            kb, vb = jnp.zeros((b, n, blk, h), kv.k.dtype), jnp.zeros((b, n, blk, h), kv.v.dtype)
        if kv.on_host and not host.is_host(kb):
            kb, vb = host.to_host(kb), host.to_host(vb)
        j = jnp.arange(p, dtype=jnp.int32)[None, :]
        ok = ((j + 1) * blk <= win_start[:, None]) & ((j + 1) * blk > sink_end[:, None])
        got_n = min(self.topk, p) * blk
        empty = SlotKV(
            k=jnp.zeros((b, n, got_n, h), kv.k.dtype),
            v=jnp.zeros((b, n, got_n, h), kv.v.dtype),
            pos=jnp.full((b, n, got_n), -1, jnp.int32),
            fill=jnp.asarray(got_n, jnp.int32),
        )
        dense_turn = self.question == "dense"
        st = OffloadKV(local, empty, kb, vb, reps, ok, sink_end.astype(jnp.int32), blk, kv.on_host, dense_turn)
        return st.replace(got=self.retrieve(st, self.scores(st, st.local, state.qbuf, state.qpos, ctx)[1]))

    def _block_means(self, k_src, t: int, size: int, n: int, h: int) -> jax.Array:
        """Mean post-RoPE key of each block of the first `size` slots: [B, N, size / block, H]
        float32, read a prefill chunk at a time."""
        blk = self.block
        per = min(t, size) if t < k_src.shape[2] else size
        read = token_blocks(k_src, per)
        nread = -(-size // per)

        def one(j):
            x = read(j).astype(jnp.float32)
            b = x.shape[0]
            return x.reshape(b, n, per // blk, blk, h).mean(axis=3)

        if nread == 1:
            return one(0)[:, :, : size // blk]
        means = jax.lax.map(one, jnp.arange(nread))  # [R, B, N, per / blk, H]
        means = jnp.moveaxis(means, 0, 2)
        return means.reshape(means.shape[0], n, -1, h)[:, :, : size // blk]

    # ---- retrieval ------------------------------------------------------------------------------
    def block_scores(self, st: OffloadKV, qmean: jax.Array) -> jax.Array:
        """ReKV's score (select="cosine"): the cosine similarity of each block's mean key with the
        question's mean query, all KV heads' channels concatenated: qmean [B, N, H] -> [B, P]
        float32 (-inf for blocks the question may not retrieve)."""
        b, n, p, h = st.reps.shape
        r = jnp.swapaxes(st.reps, 1, 2).reshape(b, p, n * h)
        qf = qmean.astype(jnp.float32).reshape(b, n * h)
        dot = jnp.einsum("bpd,bd->bp", r, qf, precision="highest")
        norm = jnp.linalg.norm(r, axis=-1) * jnp.linalg.norm(qf, axis=-1)[:, None]
        cos = dot / jnp.maximum(norm, 1e-8)
        return jnp.where(st.ok, cos, -jnp.inf)

    @staticmethod
    def mean_query(q: jax.Array, q_pos: jax.Array, num_kv_heads: int) -> jax.Array:
        """The question's mean query onto KV heads: q [B, T, Nq, H] averaged over each KV head's
        query heads and summed over the valid tokens (q_pos >= 0; a cosine ignores the scale)
        -> [B, N, H] float32."""
        b, t, nq, h = q.shape
        qm = q.astype(jnp.float32).reshape(b, t, num_kv_heads, nq // num_kv_heads, h).mean(axis=3)
        return jnp.sum(jnp.where((q_pos >= 0)[:, :, None, None], qm, 0.0), axis=1)

    def attend_all(self, st: OffloadKV, local: SlotKV, q, q_pos, ctx: LayerContext):
        """Exact attention of q [B, T, Nq, H] at q_pos [B, T] over every token of the row:
        `local` (sinks, window and the question's own tokens) and every retrievable block, read
        from the store one block at a time (`host.slice_tokens`: each block's K and V cross from
        host memory once), merged through log-sum-exps. Returns (out [B, T, Nq, H], mass [B, N, P]
        float32): the softmax mass the queries put on each block's tokens, exp(lse_block -
        lse_all) summed over the valid queries and the G query heads of each KV head (-inf for
        blocks the question may not retrieve)."""
        b, t, nq, _ = q.shape
        n, blk, p = st.k.shape[1], st.block, st.reps.shape[2]
        out, lse = attend_segments(q, q_pos, [(local.k, local.v, local.pos)], ctx)
        read_k, read_v = token_blocks(st.k, blk), token_blocks(st.v, blk)

        def one(carry, j):
            o, l = carry
            pos = j * blk + jnp.arange(blk, dtype=jnp.int32)
            keep = jnp.take(st.ok, j, axis=1)[:, None] & (pos[None, :] >= st.sink_end[:, None])  # [B, blk]
            kpos = jnp.broadcast_to(jnp.where(keep, pos[None, :], -1)[:, None, :], (b, n, blk))
            o2, l2 = attend_segments(q, q_pos, [(read_k(j), read_v(j), kpos)], ctx)
            o, l = attention.merge_partials([o, o2.astype(jnp.float32)], [l, l2])
            return (o, l), l2

        (out, lse), lse_blocks = jax.lax.scan(one, (out.astype(jnp.float32), lse), jnp.arange(p))  # [P, B, T, Nq]
        seen = (q_pos >= 0)[None, :, :, None] & jnp.isfinite(lse)[None] & jnp.isfinite(lse_blocks)
        share = jnp.where(seen, jnp.exp(jnp.where(seen, lse_blocks - lse[None], 0.0)), 0.0)
        mass = jnp.moveaxis(share.reshape(p, b, t, n, nq // n).sum(axis=(2, 4)), 0, 2)  # [B, N, P]
        return out.astype(q.dtype), jnp.where(st.ok[:, None, :], mass, -jnp.inf)

    def scores(self, st: OffloadKV, local: SlotKV, q, q_pos, ctx: LayerContext):
        """The question's blocks scores [B, N, P] (-inf: not retrievable) under `select`, and its
        attention output [B, T, Nq, H] over every token when question="dense" (else None)."""
        out = mass = None
        if self.question == "dense":
            out, mass = self.attend_all(st, local, q, q_pos, ctx)
        if self.selection == "attention":
            return out, mass
        cos = self.block_scores(st, self.mean_query(q, q_pos, st.k.shape[1]))
        return out, jnp.broadcast_to(cos[:, None, :], (cos.shape[0], st.k.shape[1], cos.shape[1]))

    def retrieve(self, st: OffloadKV, scores: jax.Array) -> SlotKV:
        """The top `topk` blocks of each KV head by scores [B, N, P] (-inf: not retrievable),
        fetched from the block store: a SlotKV [B, N, topk * block, H], each head's blocks in
        block order (positions -1 for unused entries and for sink tokens, which `local` holds)."""
        b, n, _ = scores.shape
        blk = st.block
        width = st.got.capacity // blk
        vals, ids = jax.lax.top_k(scores, width)  # [B, N, W]
        valid = jnp.isfinite(vals)
        order = jnp.argsort(jnp.where(valid, ids, jnp.iinfo(jnp.int32).max), axis=-1)
        ids, valid = jnp.take_along_axis(ids, order, axis=-1), jnp.take_along_axis(valid, order, axis=-1)
        rows = (ids[..., None] * blk + jnp.arange(blk)).reshape(b, n, -1).astype(jnp.int32)
        ok = jnp.repeat(valid, blk, axis=-1) & (rows >= st.sink_end[:, None, None])
        return SlotKV(
            k=gather_tokens(st.k, rows),
            v=gather_tokens(st.v, rows),
            pos=jnp.where(ok, rows, -1),
            fill=st.got.fill,
        )

    # ---- decode -------------------------------------------------------------------------------------
    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, OffloadKV):
            raise PolicyError("offload: decode needs the state a final prefill chunk produces")
        local = slots.append(state.local, k, v, q_pos)
        got = state.got
        if ctx.new_turn:  # a question: choose the blocks (module doc)
            out, scores = self.scores(state, local, q, q_pos, ctx)
            got = self.retrieve(state, scores)
            if out is not None:  # question="dense": it attended over every block
                return state.replace(local=local, got=got), out
        out, _ = attend_segments(q, q_pos, [(local.k, local.v, local.pos), (got.k, got.v, got.pos)], ctx)
        return state.replace(local=local, got=got), out
