"""Run any policy on a cache sharded along the sequence (context parallelism).

`SeqSharded(inner)` is the policy the model sees inside `shard_map` over the ring axis.
Every shard holds `inner`'s state for its own tokens; the wrapper only changes where
attention looks, through `ctx.implementation` (an attention function is a valid
`implementation` of `kvjax.attention.attend`):

- prefill: the shard's queries attend over every shard's slots by ring attention
  (`RingAttention`, `kvjax.parallel.ring`);
- decode: the new token's query (the same on every shard) attends to the local slots and
  the shards' partial results merge through their log-sum-exp with `psum`
  (`ShardMergeAttention`); no shard ever holds another shard's K/V.

New decode tokens are stored by shard 0 (which, in zigzag order, also holds the prompt's
last chunk): the others receive the token with position -1, so their append leaves an
invisible slot, and the attention recovers the true position with a `pmax`. Compression
(`after_prefill`, `compress`, `ingest`) runs on each shard's own slots: quantizers
quantize each shard's tokens (each shard keeps its own full-precision residual window);
an eviction policy keeps its budget per shard, which is only allowed when its scores need
nothing but the slot (`SHARD_LOCAL_SCORES`): observation-window scorers (SnapKV, PyramidKV,
AdaKV) would score with the wrong queries and are refused, as are policies that evict
while decoding (which token a shard drops would depend on the other shards).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from .. import attention
from ..policies.base import Policy, PolicyError
from ..policies.compose import Compose
from ..policies.dense import Dense
from ..policies.eviction import EvictionPolicy
from ..state import LayerContext
from .kernels import resolve_prefix_implementation
from .ring import _mass, ring_attention_local

#: eviction policies whose per-slot scores depend on that slot only (so a shard can score
#: its own slots exactly); each shard then keeps its budget of its own tokens.
SHARD_LOCAL_SCORES = ("knorm",)


@dataclasses.dataclass(frozen=True)
class RingAttention:
    """An `attend` implementation for ring prefill over mesh axis `axis` (call inside shard_map):
    `ring_attention_local` with its blocks through `attend(implementation=inner)`, or through the
    zigzag schedule's `prefix_implementation`. Frozen and hashable: a static jit argument."""

    axis: str
    prefix_implementation: str | None = None
    inner: object = None

    def __call__(self, q, k, v, q_pos, k_pos, *, window=None, scale=None, want_mass=False):
        return ring_attention_local(
            q,
            k,
            v,
            q_pos,
            k_pos,
            axis=self.axis,
            window=window,
            scale=scale,
            want_mass=want_mass,
            implementation=self.inner,
            prefix_implementation=self.prefix_implementation,
        )


def shard_merge_attention(
    q, k, v, q_pos, k_pos, *, axis: str, window=None, scale=None, want_mass=False, implementation=None
) -> attention.AttentionOutput:
    """Decode attention over a sequence-sharded cache (call inside shard_map over `axis`).

    q [B, T, Nq, H] and q_pos [B, T] are the new tokens (q_pos -1 on shards that do not
    store them: the true positions are recovered by pmax); k, v [B, N, S, H], k_pos
    [B, N, S] this shard's slots. Local attention, then an LSE merge across shards."""
    q_pos = lax.pmax(q_pos, axis)
    r = attention.attend(q, k, v, q_pos, k_pos, window=window, scale=scale, implementation=implementation)
    lse = r.lse.astype(jnp.float32)
    m = lax.pmax(lse, axis)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)
    num = lax.psum(r.out.astype(jnp.float32) * w[..., None], axis)
    den = lax.psum(w, axis)
    out = (num / jnp.where(den > 0, den, 1.0)[..., None]).astype(q.dtype)
    lse = jnp.where(den > 0, m_safe + jnp.log(jnp.where(den > 0, den, 1.0)), -jnp.inf)
    mass = None
    if want_mass:
        mass = _mass(q, q_pos, lse, k, k_pos, window, scale)
    return attention.AttentionOutput(out, lse, mass)


@dataclasses.dataclass(frozen=True)
class ShardMergeAttention:
    """An `attend` implementation for decode over a cache sharded along mesh axis `axis`
    (`shard_merge_attention`, local attention through `attend(implementation=inner)`)."""

    axis: str
    inner: object = None

    def __call__(self, q, k, v, q_pos, k_pos, *, window=None, scale=None, want_mass=False):
        return shard_merge_attention(
            q,
            k,
            v,
            q_pos,
            k_pos,
            axis=self.axis,
            window=window,
            scale=scale,
            want_mass=want_mass,
            implementation=self.inner,
        )


@dataclasses.dataclass(frozen=True)
class SeqSharded(Policy):
    """inner: the policy each shard runs; axis: the ring mesh axis; prefix_implementation: None
    (ring blocks through `attend`) or the zigzag schedule's prefix-block implementation
    ("reference", "pallas", "cudnn"; `kernel=` is its deprecated name)."""

    name = "seq_sharded"
    inner: Policy = dataclasses.field(default_factory=Dense)
    axis: str = "seq"
    prefix_implementation: str | None = None
    kernel: str | None = None  # deprecated name of prefix_implementation (moved there, then None)

    def __post_init__(self):
        prefix = resolve_prefix_implementation(self.prefix_implementation, self.kernel, optional=True)
        object.__setattr__(self, "prefix_implementation", prefix)
        object.__setattr__(self, "kernel", None)
        if not isinstance(self.inner, Policy):
            raise PolicyError(f"SeqSharded wraps a Policy, got {self.inner!r}")
        first = self.inner.policies[0] if isinstance(self.inner, Compose) else self.inner
        if isinstance(first, EvictionPolicy) and first.name not in SHARD_LOCAL_SCORES:
            raise PolicyError(
                f"policy {first.name!r} scores the prompt with its last queries (an observation window); "
                "on a cache sharded along the sequence each shard holds other tokens (zigzag order), so it "
                f"would select the wrong ones. Eviction policies whose scores need only the slot itself "
                f"work: {SHARD_LOCAL_SCORES}; or prefill dense with kvjax.parallel and compress on one device"
            )
        if self.inner.evicts_on_decode:
            raise PolicyError(
                f"policy {self.inner.spec()!r} evicts while decoding; that cannot run on a cache sharded "
                "along the sequence (each shard would evict on its own). Use a prefill-time policy "
                "(dense, snapkv, quantizers, ...) with kvjax.parallel"
            )

    @property
    def stores_slots(self) -> bool:  # type: ignore[override]
        return self.inner.stores_slots

    def spec(self) -> str:
        return self.inner.spec()

    def validate(self, prompt_len, config):
        self.inner.validate(prompt_len, config)

    def prefill_capacity(self, prompt_len, max_new_tokens):
        return self.inner.prefill_capacity(prompt_len, max_new_tokens)

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        return self.inner.init_layer(layer, batch, prompt_len, max_new_tokens, config, dtype)

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        impl = RingAttention(self.axis, self.prefix_implementation, ctx.implementation)
        return self.inner.prefill(state, q, k, v, q_pos, dataclasses.replace(ctx, implementation=impl))

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        impl = ShardMergeAttention(self.axis, ctx.implementation)
        owner = lax.axis_index(self.axis) == 0
        q_pos = jnp.where(owner, q_pos, -1)
        return self.inner.decode(state, q, k, v, q_pos, dataclasses.replace(ctx, implementation=impl))

    def compress(self, state, ctx: LayerContext, **observations):
        return self.inner.compress(state, ctx, **observations)

    def ingest(self, slots_state, ctx: LayerContext):
        return self.inner.ingest(slots_state, ctx)
