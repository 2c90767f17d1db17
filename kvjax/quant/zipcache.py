"""ZipCache (He et al., arXiv:2405.14256): channel-separable token-wise quantization with
salient tokens at a higher bit-width.

Quantization: every channel is divided by c = sqrt(max |x|) over the prompt's tokens
(per head and channel, float16, kept in the state), then each token is quantized with
one asymmetric scale/zero (token-wise), and multiplied back by c on dequantization.
Saliency: the normalized attention score of a token (attention it receives divided by
the number of queries that can see it, which removes the causal mask's bias towards
early tokens), estimated with probe queries only (the paper's efficient approximation:
5% most recent + 5% random prompt queries), so no full attention matrix is formed.
The `salient` fraction of tokens is stored at `high_bits`, the rest at `bits`, in two
streams. During decoding new tokens stay in full precision for `stream_gap` steps (the
paper's streaming gap), while the decode queries add to their normalized scores; then
the block is split by saliency and quantized.

When ZipCache ingests another policy's kept slots (Compose), no queries are available:
the most recent kept tokens are then taken as the salient ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..attention import attention_probs
from ..pallas_kernels import packing
from ..policies.base import PolicyError
from ..policies.registry import register
from . import affine
from .base import QuantPolicy, Stream, take_tokens

AUTO_HIGH = {2: 4, 3: 4, 4: 8, 8: 8}


@dataclasses.dataclass(frozen=True)
class ZipCodec:
    """Token-wise quantization of x / c (c: aux channel scales [B, N, H])."""

    bits: int
    head_dim: int

    def encode(self, k, v, pos, aux):
        kc, ks, kz = affine.quant_tokenwise(k / aux["k_ch"][:, :, None].astype(jnp.float32), self.bits, self.head_dim)
        vc, vs, vz = affine.quant_tokenwise(v / aux["v_ch"][:, :, None].astype(jnp.float32), self.bits, self.head_dim)
        return {"k_codes": kc, "k_scale": ks, "k_zero": kz, "v_codes": vc, "v_scale": vs, "v_zero": vz}

    def decode(self, d, aux):
        h = self.head_dim
        k = affine.dequant_tokenwise(d["k_codes"], d["k_scale"], d["k_zero"], self.bits, h, h)
        v = affine.dequant_tokenwise(d["v_codes"], d["v_scale"], d["v_zero"], self.bits, h, h)
        return (k * aux["k_ch"][:, :, None].astype(jnp.float32), v * aux["v_ch"][:, :, None].astype(jnp.float32), None)


def probe_scores(q, q_pos, k, k_pos, frac: float = 0.05, seed: int = 0):
    """Normalized attention scores [B, N, S] from probe queries: the last n and n random
    queries of each row, n = max(1, round(frac * length)) for the row's true length (q [B, T,
    Nq, H], q_pos [B, T]). Probe i's random draw depends only on (seed, i), so a row gets the
    same probes alone or in any batch, whatever the padded width T."""
    t = q.shape[1]
    n_max = max(1, round(frac * t))
    length = jnp.sum(q_pos >= 0, axis=1)
    n = jnp.clip(jnp.round(frac * length), 1, n_max).astype(jnp.int32)  # [B]
    i = jnp.arange(n_max)[None]
    recent = jnp.where(i < n[:, None], length[:, None] - n[:, None] + i, -1)
    u = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(jax.random.key(seed), j)))(jnp.arange(n_max))
    rand = jnp.floor(u[None] * jnp.maximum(length - n, 1)[:, None]).astype(jnp.int32)
    rand = jnp.where(i < n[:, None], rand, -1)
    picks = jnp.concatenate([recent, rand], axis=1)
    idx = jnp.clip(picks, 0, t - 1)
    ppos = jnp.where(picks >= 0, jnp.take_along_axis(q_pos, idx, axis=1), -1)
    qp = jnp.take_along_axis(q, idx[:, :, None, None], axis=1)
    probs = attention_probs(qp, k, ppos, k_pos)  # [B, N, G, P, S]
    g = probs.shape[2]
    seen = (
        (k_pos[:, :, None, :] <= ppos[:, None, :, None]) & (k_pos[:, :, None, :] >= 0) & (ppos[:, None, :, None] >= 0)
    )
    return jnp.sum(probs, axis=(2, 3)) / jnp.maximum(jnp.sum(seen, axis=2) * g, 1)


@register
@dataclasses.dataclass(frozen=True)
class ZipCache(QuantPolicy):
    """ZipCache: ordinary tokens at `bits`, the `salient` fraction at `high_bits` (0 = 4
    for 2/3-bit, 8 for 4-bit); new tokens quantized every `stream_gap` decode steps."""

    name = "zipcache"
    bits: int = 2
    high_bits: int = 0
    salient: float = 0.6
    stream_gap: int = 100
    residual: int = 0
    tracks_residual_mass = True

    def __post_init__(self):
        for what, b in (("bits", self.bits), ("high_bits", self.hb)):
            if b not in packing.SUPPORTED_BITS:
                raise PolicyError(f"zipcache: {what}={b!r} is not supported; expected one of {packing.SUPPORTED_BITS}")
        if not 0 <= self.salient <= 1:
            raise PolicyError(f"zipcache: salient={self.salient!r} must be a fraction in [0, 1]")
        if self.stream_gap < 1 or self.residual < 0:
            raise PolicyError(f"zipcache: stream_gap={self.stream_gap} must be >= 1 and residual={self.residual} >= 0")

    @property
    def hb(self) -> int:
        return self.high_bits or AUTO_HIGH.get(self.bits, 8)

    @property
    def n_hi(self) -> int:
        return round(self.salient * self.stream_gap)

    def block(self, ctx):
        return self.stream_gap

    def stream_codecs(self, ctx):
        h = ctx.config.head_dim
        return (ZipCodec(self.hb, h), ZipCodec(self.bits, h))

    def prompt_scores(self, state, q, q_pos, res, ctx):
        return probe_scores(q, q_pos, state.k, state.pos, seed=ctx.layer)

    def init_aux(self, k, v, pos, scores, ctx):
        valid = (pos >= 0)[..., None]
        ch = {
            f"{n}_ch": jnp.maximum(
                jnp.sqrt(jnp.max(jnp.where(valid, jnp.abs(x.astype(jnp.float32)), 0), axis=2)), 1e-2
            ).astype(jnp.float16)
            for n, x in (("k", k), ("v", v))
        }
        return ch

    def residual_aux(self, aux, res_scores, valid, ctx):
        score = jnp.zeros(valid.shape, jnp.float32) if res_scores is None else jnp.where(valid, res_scores, 0.0)
        return {**aux, "res_score": score, "res_cnt": valid.astype(jnp.float32)}

    def _split(self, k, v, pos, rank, live, n_hi_tokens, cap_hi, cap_lo, aux, ctx):
        order = jnp.argsort(-jnp.where(live, rank, -jnp.inf), axis=2, stable=True)
        hi_idx = order[:, :, :cap_hi]
        lo_idx = take_tokens(order, jnp.clip(n_hi_tokens[..., None] + jnp.arange(cap_lo), 0, k.shape[2] - 1))
        c_hi, c_lo = self.stream_codecs(ctx)
        return (
            c_hi.encode(take_tokens(k, hi_idx), take_tokens(v, hi_idx), None, aux),
            c_lo.encode(take_tokens(k, lo_idx), take_tokens(v, lo_idx), None, aux),
        )

    def encode_prompt(self, k, v, pos, count, scores, aux, ctx, cap):
        t, h = self.stream_gap, self.n_hi
        nhi = count // t * h
        rank = scores if scores is not None else pos.astype(jnp.float32)  # no queries: most recent
        live = jnp.arange(cap) < count[..., None]
        hi, lo = self._split(k, v, pos, rank, live, nhi, cap // t * h, cap // t * (t - h), aux, ctx)
        return (Stream(hi, nhi, h, cap // t * h), Stream(lo, count - nhi, t - h, cap // t * (t - h))), aux

    def block_scores(self, state, t):
        return state.aux["res_score"][:, :, :t] / jnp.maximum(state.aux["res_cnt"][:, :, :t], 1.0)

    def encode_block(self, k, v, pos, scores, aux, ctx):
        t, h = self.stream_gap, self.n_hi
        live = jnp.ones(scores.shape, bool)
        return self._split(k, v, pos, scores, live, jnp.full(scores.shape[:2], h), h, t - h, aux, ctx)

    def residual_mass(self, state, mass, ctx):
        """mass [B, N, R+T] is summed over the G query heads of each KV head."""
        aux = state.aux
        seen = (state.res_pos >= 0).astype(jnp.float32)
        return state.replace(
            aux={
                **aux,
                "res_score": aux["res_score"] + mass * seen / ctx.config.group_size,
                "res_cnt": aux["res_cnt"] + seen,
            }
        )

    def shift_aux(self, aux, full, t):
        def shift(x):
            moved = jnp.concatenate([x[:, :, t:], jnp.zeros_like(x[:, :, :t])], axis=2)
            return jnp.where(full[..., None], moved, x)

        return {**aux, "res_score": shift(aux["res_score"]), "res_cnt": shift(aux["res_cnt"])}
