"""A^2ATS: every token kept, each decode step reads the top-k keys found through vector-quantized codes.

He et al., "A^2ATS: Retrieval-Based KV Cache Reduction via Windowed Rotary Position Embedding
and Query-Aware Vector Quantization" (ACL Findings 2025), arXiv:2502.12665. Offline
(`kvjax calibrate --method a2ats`, `kvjax.quant.calibration.a2ats_fit`), per layer and KV head:
queries rotated to a fixed relative position w (windowed RoPE), H = sum q q^T over the GQA
group, its Cholesky factor L, and product-quantization codebooks of the pre-RoPE keys in the
L-transformed space (k' = L^T k, M sub-vectors, C centroids each: the query-aware distortion).

At prefill (dense, exact) every token gets a code [M] (uint8): its nearest centroid per
sub-vector. At decode, per query head: q~ = q rotated to position w (pre-RoPE q at w), q' =
L^-1 q~ and a lookup table LUT[m, c] = q'_m . c'_{m,c}, so q~ . k ~= sum_m LUT[m, code_m(k)]
for every key (the logit as if the key were w tokens back). Each query head takes its top
`topk` fraction of the tokens seen (ceil per row and KV head, at least 1), the group's sets are
united, the `window` newest tokens and `sinks` first tokens are added, and exact attention runs
over the gathered selection only. The state holds the whole cache plus the codes (M bytes per
token per KV head).

Composes as a store after a prompt-time selector (`snapkv:budget=0.5+a2ats`: the kept slots
are coded from their own positions); refused like Quest before another store or after a
selector that evicts while decoding. The paper's host offload of the full cache is not built
(the cache stays on the device; `kv_bytes_read_per_step` counts what the step reads).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .. import attention
from ..models.rope import inverse_frequencies
from ..state import LayerContext, SlotKV, leaf_nbytes, slot_bytes_used
from . import slots
from .base import Policy, PolicyError, check_positive, trim_slots
from .registry import register


@struct.dataclass
class CodedKV:
    """kv: SlotKV [B, N, S, H]; codes [B, N, S, M] uint8 (each slot's centroid per
    sub-vector); static: rank (top-k length per query head for the largest row) and width
    (slots one step gathers per (row, KV head))."""

    kv: SlotKV
    codes: jax.Array
    rank: int = struct.field(pytree_node=False, default=1)
    width: int = struct.field(pytree_node=False, default=1)

    def nbytes_used(self) -> int:
        """Bytes of the slots holding a token: K, V, position and code."""
        kv = self.kv
        return slot_bytes_used(kv.pos >= 0, [kv.k, kv.v, kv.pos, self.codes], [kv.fill])

    def nbytes_read_per_step(self) -> int:
        """Bytes one decode step reads: every slot's code and position (the approximate scores
        and the window / sink / visibility masks), then `width` slots of K, V and position per
        (row, KV head) for the exact attention, plus the fill counter."""
        b, n, _, h = self.kv.k.shape
        per_slot = h * (self.kv.k.dtype.itemsize + self.kv.v.dtype.itemsize) + self.kv.pos.dtype.itemsize
        scan = leaf_nbytes(self.codes) + leaf_nbytes(self.kv.pos) + leaf_nbytes(self.kv.fill)
        return int(scan + b * n * self.width * per_slot)


# ---- the codec: rotations, codes, lookup-table scores -----------------------------------------------
def rotate(x: jax.Array, pos: jax.Array, cfg, inverse: bool = False) -> jax.Array:
    """RoPE (rotate-half) of heads-major x [..., S, H] at positions pos [..., S] (any sign);
    inverse=True undoes it. float32."""
    inv = jnp.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    ang = pos.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    cos, sin = jnp.cos(ang), jnp.sin(ang) * (-1.0 if inverse else 1.0)
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    return xf * cos + jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1) * sin


def encode(k_pre: jax.Array, chol: jax.Array, codebook: jax.Array) -> jax.Array:
    """Codes [B, N, S, M] uint8 of pre-RoPE keys k_pre [B, N, S, H]: per sub-vector m, the
    centroid c'_{m,c} (codebook [N, M, C, D]) nearest to (L^T k)_m (chol L [N, H, H]). The
    sub-vectors are independent, so this is the argmin over all C^M codewords of
    (k - k^)^T H (k - k^) with k^ = L^-T [c'_{1,c_1}, ..., c'_{M,c_M}]."""
    b, n, s, _ = k_pre.shape
    _, m, _, d = codebook.shape
    kt = jnp.einsum("nhd,bnsh->bnsd", chol, k_pre.astype(jnp.float32), precision="highest").reshape(b, n, s, m, d)
    cb = codebook.astype(jnp.float32)
    dist = jnp.sum(cb * cb, axis=-1)[None, :, None] - 2 * jnp.einsum(
        "bnsmd,nmcd->bnsmc", kt, cb, precision="highest"
    )  # ||k' - c'||^2 less ||k'||^2 (the same for every c)
    return jnp.argmin(dist, axis=-1).astype(jnp.uint8)


def approx_scores(q_tilde: jax.Array, linv: jax.Array, codebook: jax.Array, codes: jax.Array) -> jax.Array:
    """Approximate logits [B, N, G, S] of windowed queries q_tilde [B, N, G, H] against coded
    keys codes [B, N, S, M]: q' = L^-1 q~ (linv [N, H, H]), LUT [B, N, G, M, C] = q'_m . c'_m,
    score = sum_m LUT[m, code_m]."""
    b, n, g, _ = q_tilde.shape
    _, m, _, d = codebook.shape
    qp = jnp.einsum("nhd,bngd->bngh", linv, q_tilde.astype(jnp.float32), precision="highest").reshape(b, n, g, m, d)
    lut = jnp.einsum("bngmd,nmcd->bngmc", qp, codebook.astype(jnp.float32), precision="highest")
    s = codes.shape[2]
    total = jnp.zeros((b, n, g, s), jnp.float32)
    for i in range(m):  # M table lookups per key
        idx = jnp.broadcast_to(codes[:, :, None, :, i].astype(jnp.int32), (b, n, g, s))
        total = total + jnp.take_along_axis(lut[:, :, :, i, :], idx, axis=3)
    return total


@functools.lru_cache(maxsize=256)
def _inverse(chol_bytes: bytes, shape: tuple) -> np.ndarray:
    chol = np.frombuffer(chol_bytes, np.float32).reshape(shape).astype(np.float64)
    return np.linalg.inv(chol).astype(np.float32)


def recall_at(
    q_post: np.ndarray, k_post: np.ndarray, chol, codebook, window_pos: int, cfg, frac: float = 0.03, **kw
) -> float:
    """Recall of the exact top-k keys by A^2ATS's approximate top-k (k = ceil(frac * context),
    per query head), averaged over queries and heads: q_post [Q, Nq, H] at the last Q positions
    of a context whose post-RoPE keys are k_post [T, N, H]. Tokens in the `window` newest and
    `sinks` first positions (always read) are left out of both rankings (kw: window=64, sinks=8)."""
    window, sinks = kw.get("window", 64), kw.get("sinks", 8)
    t, n, h = k_post.shape
    nq = q_post.shape[1]
    g = nq // n
    qpos = np.arange(t - q_post.shape[0], t)
    kpos = jnp.broadcast_to(jnp.arange(t), (1, n, t))
    kh = jnp.swapaxes(jnp.asarray(k_post), 0, 1)[None]  # [1, N, T, H]
    codes = encode(rotate(kh, kpos, cfg, inverse=True), jnp.asarray(chol), jnp.asarray(codebook))
    linv = jnp.asarray(_inverse(np.ascontiguousarray(chol, np.float32).tobytes(), tuple(np.shape(chol))))
    hits = []
    for i, p in enumerate(qpos):
        q = jnp.asarray(q_post[i]).reshape(n, g, h)[None]  # [1, N, G, H]
        qt = rotate(q, jnp.full((1, n, g), window_pos - p), cfg)
        approx = np.asarray(approx_scores(qt, linv, jnp.asarray(codebook), codes))[0]  # [N, G, T]
        exact = np.einsum("ngh,nth->ngt", np.asarray(q[0]), np.swapaxes(k_post, 0, 1))
        ok = (np.arange(t) <= p - window) & (np.arange(t) >= sinks)
        k = max(1, math.ceil(frac * (p + 1)))
        for ni in range(n):
            for gi in range(g):
                e = np.where(ok, exact[ni, gi], -np.inf)
                a = np.where(ok, approx[ni, gi], -np.inf)
                top_e, top_a = set(np.argsort(-e)[:k]), set(np.argsort(-a)[:k])
                hits.append(len(top_e & top_a) / k)
    return float(np.mean(hits))


# ---- the policy -------------------------------------------------------------------------------------
@register
@dataclasses.dataclass(frozen=True)
class A2ATS(Policy):
    """topk: fraction of the tokens seen each query head retrieves; window: newest tokens
    always read; sinks: first tokens always read; calibration: artifact directory ("" = the
    user cache, then the one shipped for SmolLM2)."""

    name = "a2ats"
    topk: float = 0.03
    window: int = 64
    sinks: int = 8
    calibration: str = ""

    stores_slots: ClassVar[bool] = True
    feeds_stores: ClassVar[bool] = False
    feeds_stores_note: ClassVar[str] = "a coded cache; put a2ats last, e.g. 'snapkv:budget=0.5+a2ats'"
    retrieves: ClassVar[bool] = True

    def __post_init__(self):
        t = self.topk
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise PolicyError(f"a2ats: topk={t!r} must be a fraction of the tokens seen, in (0, 1]")
        check_positive("window", self.window, 0)
        check_positive("sinks", self.sinks, 0)

    # ---- calibration ----------------------------------------------------------------------
    def arrays(self, config) -> dict:
        from ..quant import calibration  # the artifact store (orbax), shared with the quantized caches

        a = calibration.load(self.name, config, self.calibration)
        return a

    def validate(self, prompt_len, config):
        a = self.arrays(config)
        if a["chol"].shape[2:] != (config.head_dim, config.head_dim):
            raise PolicyError(f"a2ats: calibration chol{a['chol'].shape} does not match head_dim={config.head_dim}")

    def codec(self, ctx: LayerContext):
        """(chol [N, H, H], L^-1, codebook [N, M, C, D], w) of this layer, as constants."""
        a = self.arrays(ctx.config)
        chol = np.ascontiguousarray(a["chol"][ctx.layer], np.float32)
        linv = _inverse(chol.tobytes(), chol.shape)
        return (
            jnp.asarray(chol),
            jnp.asarray(linv),
            jnp.asarray(a["codebook"][ctx.layer]),
            int(a["rope_window"][ctx.layer]),
        )

    # ---- sizes ------------------------------------------------------------------------------
    def retrieved(self, tokens):
        """Top-k length per query head for `tokens` seen (int, or an int32 array)."""
        if isinstance(tokens, int):
            return max(1, math.ceil(tokens * self.topk - 1e-6))
        return jnp.maximum(jnp.ceil(tokens.astype(jnp.float32) * jnp.float32(self.topk) - 1e-6).astype(jnp.int32), 1)

    def selection(self, capacity: int, group: int) -> tuple[int, int]:
        """Static (rank, width): the top-k length for a full cache, and the slots gathered per
        (row, KV head): G * rank + window + sinks, at most the capacity."""
        rank = min(self.retrieved(capacity), capacity)
        return rank, min(capacity, group * rank + self.window + self.sinks)

    def _coded(self, kv: SlotKV, ctx: LayerContext) -> CodedKV:
        chol, _, book, _ = self.codec(ctx)
        codes = encode(rotate(kv.k, kv.pos, ctx.config, inverse=True), chol, book)
        rank, width = self.selection(kv.capacity, ctx.config.group_size)
        return CodedKV(kv, codes, rank, width)

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        kv = SlotKV.empty(batch, config.num_kv_heads, prompt_len + max_new_tokens, config.head_dim, dtype)
        m = self.arrays(config)["codebook"].shape[2]
        rank, width = self.selection(kv.capacity, config.group_size)
        return CodedKV(kv, jnp.zeros(kv.pos.shape + (m,), jnp.uint8), rank, width)

    # ---- prefill: dense and exact; codes at the end of the prompt -----------------------------
    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        kv = slots.append(state.kv, k, v, q_pos)
        res = self.attend(kv, q, q_pos, ctx)
        if not ctx.final:
            return state.replace(kv=kv), res.out
        bound = ctx.prompt_bound
        return self._coded(trim_slots(kv, bound + ctx.max_new_tokens, bound), ctx), res.out

    def ingest(self, slots_state: SlotKV, ctx: LayerContext) -> CodedKV:
        """Code another policy's kept slots [B, N, C, H] (from their own positions), with room
        for ctx.max_new_tokens more."""
        c, pad = slots_state.capacity, ctx.max_new_tokens
        kv = SlotKV(
            k=jnp.pad(slots_state.k, ((0, 0), (0, 0), (0, pad), (0, 0))),
            v=jnp.pad(slots_state.v, ((0, 0), (0, 0), (0, pad), (0, 0))),
            pos=jnp.pad(slots_state.pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1),
            fill=jnp.asarray(c, jnp.int32),
        )
        return self._coded(kv, ctx)

    def truncate_layer(self, layer, lengths):
        """Roll back to per-row lengths [B]: the slots of later positions are emptied
        (`slots.truncate_slots`); their stale codes are never read (position -1)."""
        if not isinstance(layer, CodedKV):
            return super().truncate_layer(layer, lengths)
        return layer.replace(kv=slots.truncate_slots(layer.kv, lengths))

    # ---- decode -----------------------------------------------------------------------------
    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, CodedKV):
            raise PolicyError("a2ats: decode needs the coded state a final prefill chunk produces")
        outs = []
        for i in range(q.shape[1]):  # several new tokens: one step each, in order
            state, out = self._step(state, q[:, i : i + 1], k[:, i : i + 1], v[:, i : i + 1], q_pos[:, i : i + 1], ctx)
            outs.append(out)
        return state, jnp.concatenate(outs, axis=1)

    def _step(self, state: CodedKV, q, k, v, q_pos, ctx: LayerContext):
        chol, linv, book, w = self.codec(ctx)
        cfg = ctx.config
        kv = state.kv
        slot = jnp.minimum(kv.fill, kv.capacity - 1)  # where `append` writes the token (scalar or per row)
        kv = slots.append(kv, k, v, q_pos)
        b, n, s, h = kv.k.shape
        new_pos = jnp.broadcast_to(q_pos[:, None, :], (b, n, 1))
        code = encode(rotate(jnp.swapaxes(k, 1, 2), new_pos, cfg, inverse=True), chol, book)  # [B, N, 1, M]
        codes = jax.lax.optimization_barrier(slots.write_rows(state.codes, code, slot))  # written before read
        state = state.replace(kv=kv, codes=codes)
        # approximate logits: every key as if it were w tokens back
        g = q.shape[2] // n
        qg = q[:, 0].reshape(b, n, g, h)
        qt = rotate(qg, jnp.broadcast_to((w - q_pos[:, :1, None]), (b, n, g)), cfg)  # un-rotate from m, rotate to w
        scores = approx_scores(qt, linv, book, codes)  # [B, N, G, S]
        p, qp = kv.pos, q_pos[:, 0][:, None, None]
        seen = (p >= 0) & (p <= qp)
        always = seen & ((p > qp - self.window) | (p < self.sinks))
        ranked = jnp.where((seen & ~always)[:, :, None], scores, -jnp.inf)
        vals, top = jax.lax.top_k(ranked, state.rank)  # [B, N, G, rank]
        count = self.retrieved(jnp.sum(seen, axis=2, dtype=jnp.int32))  # [B, N]
        ok = (jnp.arange(state.rank) < count[:, :, None, None]) & jnp.isfinite(vals)
        flat_i, flat_ok = top.reshape(b, n, -1), ok.reshape(b, n, -1)
        mask = jax.vmap(jax.vmap(lambda i, o: jnp.zeros((s,), bool).at[i].max(o)))(flat_i, flat_ok) | always
        _, sel = jax.lax.top_k(jnp.where(mask, (s - jnp.arange(s)).astype(jnp.float32), 0.0), state.width)
        valid = jnp.take_along_axis(mask, sel, axis=2)
        kk = jnp.take_along_axis(kv.k, sel[..., None], axis=2)
        vv = jnp.take_along_axis(kv.v, sel[..., None], axis=2)
        pp = jnp.where(valid, jnp.take_along_axis(kv.pos, sel, axis=2), -1)
        out = attention.attend(
            q,
            kk.astype(q.dtype),
            vv.astype(q.dtype),
            q_pos,
            pp,
            window=cfg.sliding_window,
            implementation=ctx.implementation,
        ).out
        return state, out
