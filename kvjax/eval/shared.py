"""One dense prefill, many policies: the eval fast path for prompt-time eviction.

Why it is exact: an eviction policy (kvjax.policies.eviction) appends a prompt chunk,
attends over the *full* chunk, and only then compresses the layer's cache. The layer's
output, and so every later layer's input, is the dense model's. So a single prefill that
records, per layer, the queries, keys/values and the attention mass each key received
(`capture`) holds everything every such policy needs; `apply_policy` then builds that
policy's compressed state exactly as `kvjax.generation.prefill` would (tests check equality
for every registered policy `shares_prefill` accepts). Policies that do more during
prefill (merging, chunked eviction, quantizers, compositions) return False from
`shares_prefill` and are run through the real `prefill` by the callers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from ..attention import AttentionOutput
from ..generation import prefill, prompt_positions
from ..policies import slots
from ..policies.base import Policy
from ..policies.eviction import EvictionPolicy
from ..state import KVState, LayerContext, SlotKV


@struct.dataclass
class Captured:
    """One layer of a capture: kv (SlotKV, capacity = prompt bucket), q [B, T, Nq, H]
    (post-RoPE queries) and mass [B, N, T] (attention mass each key received, float32)."""

    kv: SlotKV
    q: jax.Array
    mass: jax.Array


@dataclasses.dataclass(frozen=True)
class _Capture(Policy):
    """Dense prefill that keeps its queries and key mass (never registered)."""

    name: ClassVar[str] = "capture"

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        kv = SlotKV.empty(batch, config.num_kv_heads, prompt_len, config.head_dim, dtype)
        q = jnp.zeros((batch, prompt_len, config.num_heads, config.head_dim), dtype)
        return Captured(kv, q, jnp.zeros((batch, config.num_kv_heads, prompt_len), jnp.float32))

    def prefill(self, state, q, k, v, q_pos, ctx):
        kv = slots.append(state.kv, k, v, q_pos)
        res = self.attend(kv, q, q_pos, ctx, want_mass=True)
        return Captured(kv, q.astype(state.q.dtype), res.key_mass.astype(jnp.float32)), res.out


def shares_prefill(policy) -> bool:
    """True when `policy`'s prompt-time state is a function of the dense prefill alone
    (default append + attend, then at most one `compress` after the final chunk)."""
    cls = type(policy)
    return (
        isinstance(policy, Policy)
        and cls.prefill in (Policy.prefill, EvictionPolicy.prefill)
        and cls.attend is Policy.attend
        and cls.after_prefill is Policy.after_prefill
        and cls.init_layer is Policy.init_layer
        and cls.init_state is Policy.init_state
    )


def capture(model, tokens, lengths, implementation: str | None = None):
    """Dense prefill of tokens [B, Tb] (right-padded, true lengths [B]) that records every
    layer. Returns (logits at each row's last token [B, V], KVState of `Captured`)."""
    return prefill(
        model.params,
        jnp.asarray(tokens),
        jnp.asarray(lengths, jnp.int32),
        config=model.config,
        policy=_Capture(),
        max_new_tokens=0,
        dtype=model.dtype,
        implementation=implementation,
    )


@functools.partial(jax.jit, static_argnames=("policy", "config", "max_new_tokens", "dtype", "implementation"))
def _apply(layers, lengths, *, policy, config, max_new_tokens, dtype, implementation):
    b, t = layers[0].q.shape[:2]
    q_pos = prompt_positions(lengths, t)
    out = []
    for i, cap in enumerate(layers):
        ctx = LayerContext(i, config, "prefill", True, t, max_new_tokens, implementation)
        st = policy.init_layer(i, b, t, max_new_tokens, config, dtype)
        st = slots.append(st, jnp.swapaxes(cap.kv.k, 1, 2), jnp.swapaxes(cap.kv.v, 1, 2), q_pos)
        if type(policy).prefill is EvictionPolicy.prefill:
            res = AttentionOutput(None, None, cap.mass if policy.wants_mass(ctx) else None)
            st = policy.compress(st, ctx, q=cap.q, q_pos=q_pos, res=res)
        out.append(st)
    return KVState(layers=tuple(out), lengths=lengths)


def apply_policy(model, captured: KVState, policy, max_new_tokens: int, implementation: str | None = None) -> KVState:
    """The state `prefill(..., policy=policy, max_new_tokens=...)` would return for the
    captured prompt. Raises ValueError for a policy that does not `shares_prefill`."""
    if not shares_prefill(policy):
        raise ValueError(
            f"policy {policy.spec()!r} does more than compress after a dense prefill; "
            "run it through kvjax.generation.prefill"
        )
    t = captured.layers[0].q.shape[1]
    policy.validate(t, model.config)
    return _apply(
        captured.layers,
        captured.lengths,
        policy=policy,
        config=model.config,
        max_new_tokens=max_new_tokens,
        dtype=model.dtype,
        implementation=implementation,
    )
