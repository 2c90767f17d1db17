"""Perplexity with a policy active.

Protocol (same for every method, dense included): the first `prefix` tokens are prefilled
(and compressed by the policy), then the remaining tokens are teacher-forced one at a time
through the policy's decode step; the perplexity is over those remaining tokens, the first
of them scored from the prefill logits. This measures the compressed cache the way it is
used in generation.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..generate import prefill
from ..models.forward import forward
from ..state import LayerContext


@functools.partial(jax.jit, static_argnames=("config", "policy", "dtype", "implementation"))
def _teacher_forced_nll(params, state, first_logits, targets, *, config, policy, dtype, implementation=None):
    """targets [B, N] -> summed NLL [B] over N tokens; token i+1 scored after feeding token i."""
    ctx = LayerContext(0, config, "decode", True, 0, targets.shape[1], implementation)
    b = targets.shape[0]

    def nll(logits, tgt):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tgt[:, None], axis=-1)[:, 0]

    def step(carry, tgt_pair):
        state, total = carry
        fed, nxt = tgt_pair
        logits, state = forward(
            params,
            fed[:, None],
            state.lengths[:, None],
            state,
            config=config,
            policy=policy,
            ctx=ctx,
            dtype=dtype,
            logits_at=jnp.zeros((b,), jnp.int32),
        )
        return (state, total + nll(logits, nxt)), None

    total = nll(first_logits, targets[:, 0])
    pairs = (targets[:, :-1].T, targets[:, 1:].T)
    (state, total), _ = jax.lax.scan(step, (state, total), pairs)
    return total


def perplexity(model, tokens, policy, prefix: int | None = None, implementation: str | None = None) -> dict:
    """tokens: [N] or [B, N] token ids. Returns {'ppl', 'nll', 'scored_tokens', 'kv_bytes',
    'dense_kv_bytes', 'compression_ratio'} (bytes measured right after the prefix prefill)."""
    toks = np.atleast_2d(np.asarray(tokens, np.int32))
    b, n = toks.shape
    prefix = n // 2 if prefix is None else prefix
    if not 1 <= prefix < n:
        raise ValueError(f"prefix={prefix} must be in [1, {n - 1}] for a text of {n} tokens")
    if n > model.config.max_position:
        raise ValueError(f"text of {n} tokens exceeds the model's max_position={model.config.max_position}")
    lengths = jnp.full((b,), prefix, jnp.int32)
    common = dict(config=model.config, policy=policy, dtype=model.dtype, implementation=implementation)
    first, state = prefill(model.params, jnp.asarray(toks[:, :prefix]), lengths, max_new_tokens=n - prefix, **common)
    kv_bytes = state.nbytes
    dense = state.dense_nbytes(model.config)
    total = _teacher_forced_nll(model.params, state, first, jnp.asarray(toks[:, prefix:]), **common)
    total = np.asarray(total, np.float64)
    if not np.all(np.isfinite(total)):
        raise FloatingPointError(f"non-finite NLL under policy {policy.spec()}")
    scored = n - prefix
    mean_nll = float(total.sum() / (scored * b))
    return {
        "ppl": float(np.exp(mean_nll)),
        "nll": mean_nll,
        "scored_tokens": scored * b,
        "kv_bytes": kv_bytes,
        "dense_kv_bytes": dense,
        "compression_ratio": kv_bytes / max(dense, 1),
    }
