"""Attention with soft-capped logits (Gemma 2): softmax(cap * tanh(q.k * scale / cap)).

`SoftcapAttention(cap)` is an attention function with `kvjax.attention.attention_reference`'s
signature, so it is a valid `implementation=` of `kvjax.attention.attend`: the model puts it in
`LayerContext.implementation` for a soft-capped model, and every policy's attention (dense,
eviction, quantized caches' dequantized segments, ring blocks and shard merges in
`kvjax.parallel`) goes through it. It is exact jnp attention, computed in query chunks of
`chunk` so a long prefill never holds more than [B, N, G, chunk, S] logits; the Pallas kernels
have no soft-cap, so a soft-capped model runs this path whatever implementation was asked for.
Eviction policies that score slots with their own attention probabilities (SnapKV's observation
window) score without the cap.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.attention_reference import MASK_VALUE, AttentionOutput, attention_logits, visibility_mask


def softcap_attention(q, k, v, q_pos, k_pos, *, cap: float, window=None, scale=None, want_mass=False):
    """One chunk: q [B, T, Nq, H] over k, v [B, N, S, H] with logits cap * tanh(logits / cap).
    Returns AttentionOutput(out [B, T, Nq, H], lse [B, T, Nq], key_mass [B, N, S] | None)."""
    b, t, nq, h = q.shape
    logits = attention_logits(q, k, scale)  # [B, N, G, T, S] float32
    logits = cap * jnp.tanh(logits / cap)
    mask = visibility_mask(q_pos, k_pos, window)[:, :, None]
    logits = jnp.where(mask, logits, MASK_VALUE)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.exp(logits - m) * mask
    l = jnp.sum(p, axis=-1, keepdims=True)
    seen = l > 0
    p = p / jnp.where(seen, l, 1.0)
    out = jnp.einsum("bngts,bnsh->btngh", p, v.astype(jnp.float32))  # float32 products (bf16 v is exact in it)
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]  # [B, N, G, T]
    lse = jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, nq)
    mass = jnp.sum(p, axis=(2, 3)) if want_mass else None
    return AttentionOutput(out.reshape(b, t, nq, h).astype(q.dtype), lse, mass)


@dataclasses.dataclass(frozen=True)
class SoftcapAttention:
    """An `attend` implementation with soft-capped logits (module doc). cap: Gemma 2's
    attn_logit_softcapping; inner: the implementation the layer was given (not used: recorded
    so two requests stay distinct static arguments); chunk: queries per step."""

    cap: float
    inner: object = None
    chunk: int = 512

    def __call__(self, q, k, v, q_pos, k_pos, *, window=None, scale=None, want_mass=False):
        b, t, nq, h = q.shape
        if t <= self.chunk:
            return softcap_attention(
                q, k, v, q_pos, k_pos, cap=self.cap, window=window, scale=scale, want_mass=want_mass
            )
        n = -(-t // self.chunk)
        pad = n * self.chunk - t
        qs = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, n, self.chunk, nq, h).swapaxes(0, 1)
        ps = jnp.pad(q_pos, ((0, 0), (0, pad)), constant_values=-1).reshape(b, n, self.chunk).swapaxes(0, 1)

        def one(args):
            r = softcap_attention(
                args[0], k, v, args[1], k_pos, cap=self.cap, window=window, scale=scale, want_mass=want_mass
            )
            return r.out, r.lse, (r.key_mass if want_mass else jnp.zeros((), jnp.float32))

        out, lse, mass = jax.lax.map(one, (qs, ps))
        out = out.swapaxes(0, 1).reshape(b, n * self.chunk, nq, h)[:, :t]
        lse = lse.swapaxes(0, 1).reshape(b, n * self.chunk, nq)[:, :t]
        return AttentionOutput(out, lse, jnp.sum(mass, axis=0) if want_mass else None)
