"""Exact attention in jnp: the reference every attention implementation is checked against, the
CPU path of `kvjax.attention.attend`, and the pieces the kernels' path shares with it.

Layouts (kvjax-wide):
    q      [B, T, Nq, H]   new queries (post-RoPE)
    k, v   [B, N, S, H]    cache slots, heads-major (N = num_kv_heads, Nq = N * G)
    q_pos  [B, T]  int32   absolute position of each query (-1 = padding)
    k_pos  [B, N, S] int32 absolute position held by each slot (-1 = empty)

A slot is visible to a query when 0 <= k_pos <= q_pos (and q_pos - k_pos < window for
local attention). Because visibility is decided by positions, evicted, merged and
re-ordered caches need no special masks. Partial results over disjoint slot sets merge
through their log-sum-exps (`merge_partials`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class AttentionOutput(NamedTuple):
    """out [B, T, Nq, H]; lse [B, T, Nq] (log-sum-exp of scaled logits, -inf when a row
    sees nothing) or None; key_mass [B, N, S] (softmax mass each slot received, summed
    over queries and the G query heads sharing it; H2O's statistic) or None."""

    out: jax.Array
    lse: jax.Array | None = None
    key_mass: jax.Array | None = None


def visibility_mask(q_pos: jax.Array, k_pos: jax.Array, window: int | None = None) -> jax.Array:
    """Boolean [B, N, T, S]: which slot each query may attend to."""
    qp = q_pos[:, None, :, None]
    kp = k_pos[:, :, None, :]
    mask = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if window is not None:
        mask &= (qp - kp) < window
    return mask


def _cpu_dot_operands(*xs):
    """XLA:CPU cannot run some bf16 x bf16 -> f32 dots under jit ("Unsupported element type
    for DotThunk::Execute"); products of bf16/f16 values are exact in f32, so upcasting the
    operands there computes the same dot. Other backends keep the narrow operands."""
    if jax.default_backend() != "cpu":
        return xs
    return tuple(x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x for x in xs)


def attention_logits(q: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
    """Scaled logits [B, N, G, T, S] in float32 for q [B, T, N*G, H], k [B, N, S, H]."""
    b, t, nq, h = q.shape
    n = k.shape[1]
    if nq % n:
        raise ValueError(f"query heads {nq} must be a multiple of key heads {n}")
    scale = h**-0.5 if scale is None else scale
    if t == 1 and jax.default_backend() == "cpu":
        # One decode query per row: a multiply-reduce over H instead of a dot. XLA:CPU lowers
        # the batch-1 dot form through a bitcast of the freshly updated cache that it fuses with
        # the cache update and duplicates, copying every K/V buffer 3-4 times per layer per step
        # (seen in the optimized HLO; gone at batch 2). The reduce reads the cache in place.
        qg = q.reshape(b, n, nq // n, 1, 1, h).astype(jnp.float32)
        return jnp.sum(qg * k[:, :, None, None].astype(jnp.float32), axis=-1) * scale
    qg, k = _cpu_dot_operands(q.reshape(b, t, n, nq // n, h), k)
    return jnp.einsum("btngh,bnsh->bngts", qg, k, preferred_element_type=jnp.float32) * scale


def attention_probs(q, k, q_pos, k_pos, *, window=None, scale=None) -> jax.Array:
    """Softmax probabilities [B, N, G, T, S] (float32); rows that see nothing are zero."""
    logits = attention_logits(q, k, scale)
    mask = visibility_mask(q_pos, k_pos, window)[:, :, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m) * mask
    return p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)


def _attention_block(q, k, v, q_pos, k_pos, window, scale, want_mass):
    b, t, nq, h = q.shape
    logits = attention_logits(q, k, scale)
    mask = visibility_mask(q_pos, k_pos, window)[:, :, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m) * mask
    l = jnp.sum(p, axis=-1, keepdims=True)
    seen = l > 0
    p_norm = p / jnp.where(seen, l, 1.0)
    out = jnp.einsum(
        "bngts,bnsh->btngh", *_cpu_dot_operands(p_norm.astype(v.dtype), v), preferred_element_type=jnp.float32
    )
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]  # [B,N,G,T]
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, nq)
    mass = jnp.sum(p_norm, axis=(2, 3)) if want_mass else None
    return out.reshape(b, t, nq, h).astype(q.dtype), lse, mass


def _skipping_attention(q, k, v, q_pos, k_pos, window, scale, kv_chunk, skip=True):
    """Online-softmax (flash-style) attention of q [B,T,Nq,H] over the slots in blocks of
    `kv_chunk`: the scores live one [B, N, G, T, kv_chunk] tile at a time, never [T, S]. With
    `skip`, every block no query can see (its valid positions all lie after the last query's, or
    before the window) is skipped with `lax.cond`, so the work is not done (on a causal prefill
    about half of the blocks); without it every block is computed and masked (no conditional: on
    GPUs and TPUs each `lax.cond` is a device-to-host sync). Exact for any slot layout.
    Returns (out [B,T,Nq,H], lse [B,T,Nq])."""
    b, t, nq, h = q.shape
    n, s = k.shape[1], k.shape[2]
    g = nq // n
    nb = -(-s // kv_chunk)
    pad = nb * kv_chunk - s
    if pad:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
        k_pos = jnp.pad(k_pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
    big = jnp.iinfo(jnp.int32).max
    kpb = k_pos.reshape(b, n, nb, kv_chunk)
    kmin = jnp.min(jnp.where(kpb >= 0, kpb, big), axis=(0, 1, 3))  # [nb]
    kmax = jnp.max(kpb, axis=(0, 1, 3))
    qmax = jnp.max(jnp.where(q_pos >= 0, q_pos, -1))
    qmin = jnp.min(jnp.where(q_pos >= 0, q_pos, big))
    scale = h**-0.5 if scale is None else scale
    (qg,) = _cpu_dot_operands(q.reshape(b, t, n, g, h))

    def block(j, carry):
        m, l, acc = carry
        start = j * kv_chunk
        kb, vb = (jax.lax.dynamic_slice_in_dim(x, start, kv_chunk, axis=2) for x in (k, v))
        pb = jax.lax.dynamic_slice_in_dim(k_pos, start, kv_chunk, axis=2)
        kb, vb = _cpu_dot_operands(kb, vb)
        logits = jnp.einsum("btngh,bnsh->bngts", qg, kb, preferred_element_type=jnp.float32) * scale
        mask = visibility_mask(q_pos, pb, window)[:, :, None]
        logits = jnp.where(mask, logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1, keepdims=True))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        alpha = jnp.exp(m - m_safe)
        p = jnp.exp(logits - m_safe)
        l = l * alpha + jnp.sum(p, axis=-1, keepdims=True)
        pv = jnp.einsum("bngts,bnsh->bngth", p.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l, acc * alpha + pv

    def maybe(j, carry):
        if not skip:
            return block(j, carry)
        visible = (kmin[j] <= qmax) & (kmax[j] >= 0)
        if window is not None:
            visible &= kmax[j] > qmin - window
        return jax.lax.cond(visible, block, lambda _, c: c, j, carry)

    init = (
        jnp.full((b, n, g, t, 1), -jnp.inf, jnp.float32),
        jnp.zeros((b, n, g, t, 1), jnp.float32),
        jnp.zeros((b, n, g, t, h), jnp.float32),
    )
    m, l, acc = jax.lax.fori_loop(0, nb, maybe, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]  # [B,N,G,T]
    out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, nq, h)
    return out.astype(q.dtype), jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, nq)


#: Bytes of float32 scores one query chunk of the reference may hold off the CPU before it switches
#: to key blocks with an online softmax (`attention_reference`).
SCORE_BUDGET = 1 << 30


def _key_block(s: int, target: int) -> int:
    """A key-block length near `target` (a power of two >= 128, at most S): the largest power of
    two <= target that divides S when one >= 64 does (no padded copy of the cache), else target."""
    target = max(128, 1 << (max(1, target).bit_length() - 1))
    if target >= s:
        return s
    for blk in (target >> i for i in range(target.bit_length())):
        if blk < 64:
            break
        if s % blk == 0:
            return blk
    return target


def attention_reference(
    q, k, v, q_pos, k_pos, *, window=None, scale=None, want_mass=False, q_chunk=512, kv_chunk=128,
    score_budget=SCORE_BUDGET,
) -> AttentionOutput:  # fmt: skip
    """Exact attention in jnp (float32 softmax), processed in query chunks of `q_chunk`
    so memory stays O(q_chunk * S). On CPU, without `want_mass`, several queries over more than
    `kv_chunk` slots take the block-skipping online softmax (`_skipping_attention`) in
    `kv_chunk` x `kv_chunk` tiles, which does not compute the blocks a causal prefill cannot
    see. On other backends, several queries whose [B, Nq, q_chunk, S] float32 scores would pass
    `score_budget` bytes (a chunk of a long prompt against a long cache) take the same online
    softmax without conditionals, over key blocks sized to the budget, so memory is bounded
    whatever S is; the slot masses of `want_mass` then come from the log-sum-exps in a second
    bounded pass (`key_mass_from_lse`). Shapes as in the module docstring."""
    b, t, nq, h = q.shape
    s = k.shape[2]
    # CPU only: on GPUs / TPUs each `lax.cond` is a device-to-host sync, and the kernels serve
    # the long prefills there anyway.
    cpu = jax.default_backend() == "cpu"
    skip = cpu and not want_mass and t > 1 and s > kv_chunk
    rows = b * nq * min(t, q_chunk) * 4
    blocked = not cpu and t > 1 and rows * s > score_budget
    if skip:
        q_chunk = kv_chunk
    elif blocked:
        kv_chunk = _key_block(s, score_budget // rows)

    def one(qc, pc):
        if skip or blocked:
            return _skipping_attention(qc, k, v, pc, k_pos, window, scale, kv_chunk, skip=skip) + (None,)
        return _attention_block(qc, k, v, pc, k_pos, window, scale, want_mass)

    if t <= q_chunk:
        out, lse, mass = one(q, q_pos)
    else:
        pad = (-t) % q_chunk
        qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        pp = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
        nc = (t + pad) // q_chunk
        qc = qp.reshape(b, nc, q_chunk, nq, h).swapaxes(0, 1)
        pc = pp.reshape(b, nc, q_chunk).swapaxes(0, 1)
        out, lse, mass = jax.lax.map(lambda a: one(*a), (qc, pc))
        out = out.swapaxes(0, 1).reshape(b, nc * q_chunk, nq, h)[:, :t]
        lse = lse.swapaxes(0, 1).reshape(b, nc * q_chunk, nq)[:, :t]
        mass = jnp.sum(mass, axis=0) if mass is not None else None
    if blocked and want_mass:
        mass = key_mass_from_lse(q, k, q_pos, k_pos, lse, window=window, scale=scale, budget_bytes=score_budget)
    return AttentionOutput(out, lse, mass)


def key_mass_from_lse(q, k, q_pos, k_pos, lse, *, window=None, scale=None, budget_bytes=1 << 29) -> jax.Array:
    """Softmax mass each slot receives, summed over queries and the G query heads of its KV head
    ([B, N, S] float32, H2O's statistic), from the queries' log-sum-exps lse [B, T, Nq] (e.g.
    a flash kernel's): p(q, s) = exp(q . k_s * scale - lse_q) for visible slots. One more pass of
    q . k in query chunks sized so a chunk's [B, N, G, chunk, S] scores stay under
    `budget_bytes`: memory O(chunk x S) instead of the reference's attention-sized tiles."""
    b, t, nq, h = q.shape
    n, s = k.shape[1], k.shape[2]
    g = nq // n
    scale = h**-0.5 if scale is None else scale
    chunk = max(1, min(t, budget_bytes // max(1, b * nq * s * 4)))
    chunk = 1 << (chunk.bit_length() - 1)  # a power of two: few distinct shapes
    pad = (-t) % chunk
    qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    pp = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1)
    lp = jnp.pad(jnp.where(jnp.isfinite(lse), lse, jnp.inf), ((0, 0), (0, pad), (0, 0)), constant_values=jnp.inf)
    nc = (t + pad) // chunk
    xs = (
        qp.reshape(b, nc, chunk, nq, h).swapaxes(0, 1),
        pp.reshape(b, nc, chunk).swapaxes(0, 1),
        lp.reshape(b, nc, chunk, nq).swapaxes(0, 1),
    )

    def one(mass, x):
        qc, pc, lc = x
        logits = attention_logits(qc, k, scale)  # [B, N, G, C, S]
        mask = visibility_mask(pc, k_pos, window)[:, :, None]
        lse_c = jnp.transpose(lc.reshape(b, chunk, n, g), (0, 2, 3, 1))[..., None]  # [B, N, G, C, 1]
        p = jnp.where(mask, jnp.exp(logits - lse_c), 0.0)
        return mass + jnp.sum(p, axis=(2, 3)), None

    mass, _ = jax.lax.scan(one, jnp.zeros((b, n, s), jnp.float32), xs)
    return mass


def merge_partials(outs, lses):
    """Merge partial attention results over disjoint key sets via their LSEs.

    outs: sequence of [B, T, Nq, H]; lses: sequence of [B, T, Nq]. Returns (out, lse)."""
    lse_all = jnp.stack(lses)
    m = jnp.max(lse_all, axis=0)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse_all - m_safe)
    total = jnp.sum(w, axis=0)
    out = sum(o.astype(jnp.float32) * wi[..., None] for o, wi in zip(outs, w))
    out = out / jnp.where(total > 0, total, 1.0)[..., None]
    lse = jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)
    return out.astype(outs[0].dtype), lse


__all__ = [
    "MASK_VALUE",
    "SCORE_BUDGET",
    "AttentionOutput",
    "attention_logits",
    "attention_probs",
    "attention_reference",
    "merge_partials",
    "visibility_mask",
]
