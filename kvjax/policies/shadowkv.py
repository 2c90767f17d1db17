"""ShadowKV: low-rank pre-RoPE keys on the device, values in host memory, sparse reconstruction.

Sun et al., "ShadowKV: KV Cache in Shadows for High-Throughput Long-Context LLM Inference"
(2024), arXiv:2410.21465. After the prompt is prefilled (exactly), per layer and row:

- keys: a truncated SVD of the prompt's pre-RoPE keys, all KV heads' channels side by side
  ([T, N*H]), rank `rank`: coefficients U S [T, r] and basis V^T [r, N*H] on the device
  (`kvjax.lowrank`; the paper's U and SV, the same product);
- values: the prompt's values in host memory (`kvjax.host`), [B, N, T, H];
- chunks of `chunk` post-RoPE keys (8 in the paper) with their mean key as a landmark; the
  `outliers` fraction of the selected chunk count (the paper's 48 next to 256) whose landmark
  represents them worst -- lowest minimum cosine similarity between landmark and member key --
  stays exact on the device (K and V), as do the prompt's last `local` chunks (and the
  tokens after the last whole chunk) and every generated token.

Decode (one new token per step): the query scores every other chunk by softmax(q . landmark
/ sqrt(H)) over the chunks, the max over the query heads of a KV head (GQA), keeps the top K
chunks (`budget`: a fraction of each row's prompt, default 1.5625% = the paper's 2048 tokens
at 128k, or a token count > 1), rebuilds their keys as U[rows] @ SV, rotates them at their
positions, fetches their values from host memory (only those rows cross to the device), and
attends over local + outliers + selected + generated tokens, merged through log-sum-exps.

A new turn's question (`LayerContext.new_turn`: a question `kvjax.Session.ask` appends after
the prompt) is prompt, which the paper prefills exactly before any sparse step; here the prompt's
exact keys are gone by then, so with `question="dense"` (default) each question token attends
over every prompt token -- the candidate chunks' keys rebuilt from the low-rank store and their
values fetched, plus the outliers and local tokens -- and only the answer's tokens select
chunks; `question="sparse"` selects for the question's tokens too.

`rank` 0 picks the paper's share of the channels, 160 of 1024 (15.6%), rounded up to a
multiple of 8: 32 of SmolLM2's 192 (its measured key spectrum is in BENCHMARKS.md). With rank
= N*H and a budget that covers every chunk the policy decodes exactly as dense attention.

Deviations from the authors' code, for static shapes and batches: the SVD is computed from
the Gram matrix of the pre-RoPE keys (its eigenvectors are their right singular vectors),
accumulated chunk by chunk, so chunked prefill (`prefill_chunk=C`, C a multiple of `chunk`)
never holds every key; chunk, outlier and selection counts are decided per row from its true
length; the selected keys are rebuilt into a small dense buffer and attended there (no
block-sparse kernel, so `chunk` need not match a kernel block); the paper reuses chunks
selected at the previous step to save host copies (its temporal cache), which with static
shapes would not shrink the copy, so every step fetches its K chunks (BENCHMARKS.md measures
how often consecutive steps pick the same chunks). Prefill is exact attention through the
`HostKV` store shared with `kvjax.policies.offload`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from .. import host, lowrank
from ..models.rope import invert_rope
from ..quant.base import rope_heads
from ..state import LayerContext, SlotKV, leaf_nbytes, leaves_nbytes, slot_bytes_used
from . import slots
from .base import Policy, PolicyError, check_positive
from .offload import HostKV, attend_segments, check_chunk, gather_tokens, prefill_step, token_blocks
from .registry import register

#: The paper's rank share of the key channels: 160 of Llama-3.1-8B's 8 x 128.
PAPER_RANK_SHARE = 160 / 1024
#: How a new turn's question tokens attend (`ShadowKV.question`).
QUESTION_MODES = ("dense", "sparse")


@struct.dataclass
class ShadowPrefill:
    """ShadowKV while its prompt is prefilled: the K/V store and the Gram matrix of the
    pre-RoPE keys so far, [B, N*H, N*H] float32."""

    kv: HostKV
    gram: jax.Array

    def nbytes_host(self) -> int:
        return self.kv.nbytes_host()


@struct.dataclass
class ShadowKVState:
    """ShadowKV's decode state (module doc).

    keys: LowRankStore, coef [B, C * chunk, r] (slot = position) and basis [B, r, N*H];
    landmarks [B, N, C, H] (the chunks' mean post-RoPE keys); cand [B, N, C] bool: chunks a
    query may select (whole prompt chunks before the local tokens, not outliers); limit [B]
    int32: chunks selected per step; outl: SlotKV of the outlier chunks' exact K, V
    [B, N, O * chunk, H]; local: SlotKV of the last prompt tokens + decode room; v [B, N,
    C * chunk, H]: the chunks' values (host memory when `on_host`). Static: chunk, width (K,
    chunks one step selects at most)."""

    keys: lowrank.LowRankStore
    landmarks: jax.Array
    cand: jax.Array
    limit: jax.Array
    outl: SlotKV
    local: SlotKV
    v: jax.Array
    chunk: int = struct.field(pytree_node=False, default=8)
    width: int = struct.field(pytree_node=False, default=1)
    on_host: bool = struct.field(pytree_node=False, default=False)

    def nbytes_host(self) -> int:
        """The values, when they are in host memory."""
        return leaf_nbytes(self.v) if self.on_host else 0

    def nbytes_used(self) -> int:
        """Everything but the empty slots of the outlier and local buffers."""
        used = 0
        for s in (self.outl, self.local):
            used += slot_bytes_used(s.pos >= 0, [s.k, s.v, s.pos], [s.fill])
        return int(used + leaves_nbytes((self.keys, self.landmarks, self.cand, self.limit, self.v)))

    def _selected_rows(self) -> int:
        b, n = self.cand.shape[:2]
        return b * n * self.width * self.chunk

    def nbytes_host_read_per_step(self) -> int:
        """The selected chunks' values, copied from host memory each step."""
        return self._selected_rows() * jnp.dtype(self.v.dtype).itemsize * self.v.shape[-1]

    def nbytes_read_per_step(self) -> int:
        """One step reads every landmark (and the selection flags), the selected chunks'
        coefficients and the basis, the outlier and local buffers, and the selected chunks'
        values (from host memory)."""
        b, n = self.cand.shape[:2]
        keys = self.keys.nbytes_read(self.width * self.chunk * n, b)  # joint coef: rows differ per head
        dev = leaves_nbytes((self.landmarks, self.cand, self.limit, self.outl, self.local))
        return int(dev + keys + self.nbytes_host_read_per_step())


def chunk_stats(k: jax.Array, chunk: int):
    """Landmarks and outlier scores of chunks of post-RoPE keys k [B, N, S, H] (S a multiple of
    chunk): (mean key per chunk [B, N, S / chunk, H] float32, min cosine similarity between the
    mean and the chunk's keys [B, N, S / chunk] float32; the paper's eps 1e-8 on the norms'
    product)."""
    b, n, s, h = k.shape
    x = k.astype(jnp.float32).reshape(b, n, s // chunk, chunk, h)
    mean = x.mean(axis=3)
    dot = jnp.einsum("bncth,bnch->bnct", x, mean, precision="highest")
    norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(mean, axis=-1)[..., None]
    return mean, jnp.min(dot / jnp.maximum(norms, 1e-8), axis=-1)


def chunk_scores(q: jax.Array, landmarks: jax.Array, cand: jax.Array) -> jax.Array:
    """The paper's selection score: q [B, Nq, H] (one query token), landmarks [B, N, C, H],
    cand [B, N, C] -> [B, N, C] float32: softmax over the candidate chunks of q . landmark /
    sqrt(H) per query head, then the max over the G query heads of each KV head (-1 for
    chunks that are not candidates, below every probability)."""
    b, nq, h = q.shape
    n = landmarks.shape[1]
    qg = q.astype(jnp.float32).reshape(b, n, nq // n, h)
    logits = jnp.einsum("bngh,bnch->bngc", qg, landmarks.astype(jnp.float32), precision="highest") / math.sqrt(h)
    logits = jnp.where(cand[:, :, None, :], logits, -jnp.inf)
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.where(cand[:, :, None, :], jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), 1e-30)
    return jnp.where(cand, jnp.max(p, axis=2), -1.0)


def select_chunks(scores: jax.Array, cand: jax.Array, limit: jax.Array, width: int):
    """Top chunks: scores [B, N, C] (`chunk_scores`), limit [B] chunks per row -> ids [B, N,
    width] int32 and valid [B, N, width] (ties: the lower chunk first, `jax.lax.top_k`)."""
    _, ids = jax.lax.top_k(scores, width)
    valid = (jnp.arange(width) < limit[:, None, None]) & jnp.take_along_axis(cand, ids, axis=2)
    return ids.astype(jnp.int32), valid


@register
@dataclasses.dataclass(frozen=True)
class ShadowKV(Policy):
    """rank: key rank (0 = the paper's 160/1024 of N*H, a multiple of 8); budget: tokens one
    step selects, a fraction of the row's prompt (<= 1) or a token count (> 1); chunk: tokens
    per chunk; local: last prompt chunks kept exact; outliers: exact outlier chunks as a
    fraction of the selected chunk count; offload: where the values live ("auto", "host",
    "device"); question: how a new turn's question tokens attend ("dense": every prompt chunk,
    "sparse": the selected ones, like answer tokens)."""

    name = "shadowkv"
    rank: int = 0
    budget: float = 0.015625
    chunk: int = 8
    local: int = 4
    outliers: float = 0.1875
    offload: str = "auto"
    question: str = "dense"

    feeds_stores: ClassVar[bool] = False
    feeds_stores_note: ClassVar[str] = "low-rank keys, values in host memory and exact outlier chunks"
    retrieves: ClassVar[bool] = True

    def __post_init__(self):
        check_positive("rank", self.rank, 0)
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or not b > 0:
            raise PolicyError(f"shadowkv: budget={b!r} must be a fraction of the prompt in (0, 1] or a token count > 1")
        if b > 1 and b != int(b):
            raise PolicyError(f"shadowkv: budget={b!r} is above 1, so a token count; it must be a whole number")
        check_positive("chunk", self.chunk)
        check_positive("local", self.local, 0)
        o = self.outliers
        if isinstance(o, bool) or not isinstance(o, (int, float)) or not 0 <= o <= 1:
            raise PolicyError(f"shadowkv: outliers={o!r} must be a fraction of the selected chunks in [0, 1]")
        if self.offload not in host.OFFLOAD_CHOICES:
            raise PolicyError(f"shadowkv: offload={self.offload!r}; expected one of {host.OFFLOAD_CHOICES}")
        if self.question not in QUESTION_MODES:
            raise PolicyError(f"shadowkv: question={self.question!r}; expected one of {QUESTION_MODES}")

    # ---- sizes --------------------------------------------------------------------------------
    def key_rank(self, config) -> int:
        """The rank used for `config` (module doc); PolicyError above N*H."""
        d = config.num_kv_heads * config.head_dim
        if self.rank > d:
            raise PolicyError(
                f"shadowkv: rank={self.rank} exceeds the key channels N*H = {config.num_kv_heads}*{config.head_dim} "
                f"= {d} of {config.name!r}"
            )
        return self.rank or min(d, -(-math.ceil(d * PAPER_RANK_SHARE) // 8) * 8)

    def chunks_for(self, length):
        """Chunks one step selects for a row of `length` prompt tokens (int or int32 array)."""
        c = self.chunk
        if self.budget > 1:
            k = -(-int(self.budget) // c)
            return k if isinstance(length, int) else jnp.full(jnp.shape(length), k, jnp.int32)
        if isinstance(length, int):
            return max(1, math.ceil(length * self.budget / c - 1e-6))
        k = jnp.ceil(length.astype(jnp.float32) * jnp.float32(self.budget) / c - 1e-6).astype(jnp.int32)
        return jnp.maximum(k, 1)

    def outliers_for(self, k):
        """Outlier chunks for a selection of k chunks (int or int32 array)."""
        if isinstance(k, int):
            return math.ceil(k * self.outliers - 1e-6)
        return jnp.ceil(k.astype(jnp.float32) * jnp.float32(self.outliers) - 1e-6).astype(jnp.int32)

    def on_host(self) -> bool:
        try:
            return host.placement(self.offload, self.name)
        except ValueError as e:
            raise PolicyError(str(e)) from None

    def validate(self, prompt_len, config):
        self.key_rank(config)
        self.on_host()
        if prompt_len % self.chunk:
            raise PolicyError(
                f"shadowkv: chunk={self.chunk} must divide the prompt bucket {prompt_len}; use a power of two"
            )

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        d = config.num_kv_heads * config.head_dim
        kv = HostKV.empty(batch, config.num_kv_heads, prompt_len, config.head_dim, dtype, self.on_host())
        return ShadowPrefill(kv, jnp.zeros((batch, d, d), jnp.float32))

    # ---- prefill --------------------------------------------------------------------------------
    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, ShadowPrefill):
            raise PolicyError("shadowkv: a prompt is prefilled into the state init_layer gives (not after decoding)")
        t = q_pos.shape[1]
        s = state.kv.k.shape[2]
        check_chunk(self.name, t, s, self.chunk, "chunk")
        pre = invert_rope(k, q_pos, ctx.config)  # [B, T, N, H] pre-RoPE
        g = state.gram + lowrank.gram(slots.to_heads_major(pre), q_pos >= 0)
        kv, out = prefill_step(state.kv, q, k, v, q_pos, ctx)
        if not ctx.final:
            return ShadowPrefill(kv, g), out
        src = (slots.to_heads_major(k), slots.to_heads_major(v)) if t == s else (kv.k, kv.v)
        return self._build(kv, g, src, t, ctx), out

    def _build(self, kv: HostKV, g, src, t: int, ctx: LayerContext) -> ShadowKVState:
        cfg, c = ctx.config, self.chunk
        b, n, s, h = kv.k.shape
        bound = min(ctx.prompt_bound or s, s)
        nc = max(bound // c, 1)  # chunk slots: whole chunks below the bound (one, empty, if none)
        size = nc * c
        length = kv.seen
        basis, _ = lowrank.fit_basis(g, self.key_rank(cfg))
        coef, landmarks, mincos = self._stream(src[0], basis, length, t, size, cfg)
        # chunks per row: whole chunks before the last `local` ones (the paper's split)
        chunks = jnp.maximum(length // c - self.local, 0)
        valid = jnp.arange(nc)[None, :] < chunks[:, None]  # [B, C]
        width = min(self.chunks_for(bound), nc)
        limit = jnp.minimum(self.chunks_for(length), chunks).astype(jnp.int32)
        n_out = min(self.outliers_for(width), nc)
        cand = jnp.broadcast_to(valid[:, None, :], (b, n, nc))
        if n_out:
            o_lim = jnp.minimum(self.outliers_for(self.chunks_for(length)), chunks)
            _, oid = jax.lax.top_k(jnp.where(cand, -mincos, -jnp.inf), n_out)
            o_ok = (jnp.arange(n_out) < o_lim[:, None, None]) & jnp.take_along_axis(cand, oid, axis=2)
            hit = jnp.zeros((b, n, nc), bool)
            hit = jax.vmap(jax.vmap(lambda hh, i, ok: hh.at[i].max(ok)))(hit, oid, o_ok)
            cand = cand & ~hit
            rows = (oid[..., None] * c + jnp.arange(c)).reshape(b, n, n_out * c)
            opos = jnp.where(jnp.repeat(o_ok, c, axis=2), rows, -1)
            outl = SlotKV(gather_tokens(src[0], rows), gather_tokens(src[1], rows), opos, jnp.zeros((), jnp.int32))
        else:
            z = jnp.zeros((b, n, 0, h), kv.k.dtype)
            outl = SlotKV(z, z, jnp.zeros((b, n, 0), jnp.int32), jnp.zeros((), jnp.int32))
        # the local tokens: from the end of the last selectable chunk to the end of the prompt
        lw = min(bound, (self.local + 1) * c - 1)
        start = chunks * c
        r = start[:, None] + jnp.arange(lw)[None, :]
        lpos = jnp.where(r < length[:, None], r, -1)
        lrows = jnp.broadcast_to(jnp.minimum(r, s - 1)[:, None, :], (b, n, lw))
        pad = ((0, 0), (0, 0), (0, ctx.max_new_tokens), (0, 0))
        local = SlotKV(
            k=jnp.pad(gather_tokens(src[0], lrows), pad),
            v=jnp.pad(gather_tokens(src[1], lrows), pad),
            pos=jnp.pad(jnp.broadcast_to(lpos[:, None, :], (b, n, lw)), pad[:3], constant_values=-1),
            fill=(length - start).astype(jnp.int32),
        )
        values = host.prefix(src[1], size) if size <= s else jnp.pad(src[1], ((0, 0), (0, 0), (0, size - s), (0, 0)))
        if kv.on_host and not host.is_host(values):
            values = host.to_host(values)
        keys = lowrank.LowRankStore(coef.astype(kv.k.dtype), basis.astype(kv.k.dtype), None, n)
        return ShadowKVState(keys, landmarks.astype(kv.k.dtype), cand, limit, outl, local, values, c, width, kv.on_host)

    def _stream(self, k_src, basis, length, t: int, size: int, cfg):
        """One pass over the prompt's post-RoPE keys (the device chunk, or the host store a
        prefill chunk at a time): coefficients [B, size, r] of the pre-RoPE keys (zero past
        each row's length), landmarks [B, N, size / chunk, H] and min cosine similarities
        [B, N, size / chunk]."""
        c = self.chunk
        s = k_src.shape[2]
        per = s if t >= s else t
        read = token_blocks(k_src, per)
        nread = -(-size // per)

        def one(j):
            kb = read(j)  # [B, N, per, H] post-RoPE
            b, n = kb.shape[:2]
            slot = j * per + jnp.arange(per, dtype=jnp.int32)
            ok = slot[None, :] < length[:, None]
            pre = rope_heads(kb, jnp.broadcast_to(slot, (b, n, per)), cfg, inverse=True)
            coef = jnp.where(ok[..., None], lowrank.project(pre, basis), 0.0)
            lm, mc = chunk_stats(kb, c)
            return coef, lm, mc

        if nread == 1:
            coef, lm, mc = one(0)
        else:
            coef, lm, mc = jax.lax.map(one, jnp.arange(nread))
            coef = jnp.moveaxis(coef, 0, 1).reshape(coef.shape[1], -1, coef.shape[-1])
            lm = jnp.moveaxis(lm, 0, 2).reshape(lm.shape[1], lm.shape[2], -1, lm.shape[-1])
            mc = jnp.moveaxis(mc, 0, 2).reshape(mc.shape[1], mc.shape[2], -1)
        have = coef.shape[1]
        if have < size:  # a prompt shorter than one chunk: one empty chunk
            coef = jnp.pad(coef, ((0, 0), (0, size - have), (0, 0)))
            lm = jnp.pad(lm, ((0, 0), (0, 0), (0, size // c - lm.shape[2]), (0, 0)))
            mc = jnp.pad(mc, ((0, 0), (0, 0), (0, size // c - mc.shape[2])))
        return coef[:, :size], lm[:, :, : size // c], mc[:, :, : size // c]

    # ---- decode ---------------------------------------------------------------------------------
    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, ShadowKVState):
            raise PolicyError("shadowkv: decode needs the state a final prefill chunk produces")
        outs = []
        for i in range(q.shape[1]):  # several new tokens: one step each, in order
            state, out = self._step(state, q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], q_pos[:, i : i + 1], ctx)
            outs.append(out)
        return state, jnp.concatenate(outs, axis=1)

    def select(self, state: ShadowKVState, q) -> tuple[jax.Array, jax.Array]:
        """The chunks query q [B, 1, Nq, H] selects: ids, valid [B, N, width]."""
        scores = chunk_scores(q[:, 0], state.landmarks, state.cand)
        return select_chunks(scores, state.cand, state.limit, state.width)

    def _step(self, state: ShadowKVState, q, k, v, q_pos, ctx: LayerContext):
        c = state.chunk
        local = slots.append(state.local, k, v, q_pos)
        if ctx.new_turn and self.question == "dense":  # a question: every candidate chunk (module doc)
            ids = jnp.broadcast_to(jnp.arange(state.cand.shape[2], dtype=jnp.int32), state.cand.shape)
            valid = state.cand
        else:
            ids, valid = self.select(state, q)
        b, n, w = ids.shape
        rows = (ids[..., None] * c + jnp.arange(c)).reshape(b, n, w * c)
        pos = jnp.where(jnp.repeat(valid, c, axis=2), rows, -1)
        keys = rope_heads(state.keys.rebuild(rows), rows, ctx.config)
        vals = gather_tokens(state.v, rows)
        segments = [(local.k, local.v, local.pos), (keys, vals, pos)]
        if state.outl.capacity:
            segments.append((state.outl.k, state.outl.v, state.outl.pos))
        out, _ = attend_segments(q, q_pos, segments, ctx)
        return state.replace(local=local), out
