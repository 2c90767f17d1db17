"""Pure functions over the Llama module: init, forward, logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .config import LlamaConfig
from .llama import Llama


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32):
    """Random parameters (normal(0.02)) as a pytree {'params': ...}; shapes only under
    `jax.eval_shape`."""
    from kvjax.policies.dense import Dense
    from kvjax.state import LayerContext

    model = Llama(config, Dense(), dtype=dtype, param_dtype=dtype)
    tokens = jnp.zeros((1, 1), jnp.int32)
    state = Dense().init_state(config, 1, 1, 0, dtype).layers
    ctx = LayerContext(layer=0, config=config, prompt_len=1)
    return model.init(key, tokens, tokens, state, ctx)


def forward(
    params,
    tokens,
    positions,
    kv_state,
    *,
    config: LlamaConfig,
    policy,
    ctx,
    dtype=jnp.float32,
    logits_at=None,
    policy_params=None,
):
    """One model call.

    tokens, positions [B, T] int32 (positions -1 mark padding); kv_state a `KVState`;
    ctx a `LayerContext` (phase, final chunk, ...). logits_at: None -> logits for all
    positions [B, T, V]; an int array [B] -> logits at those indices only [B, V].
    policy_params: None, or a pytree of traced arrays the policy reads (MatryoshkaKV's
    projections, trained through it: `jax.grad` of a loss of the logits reaches them).
    Returns (logits float32, new kv_state). The new state's `lengths` advance by the
    number of valid (position >= 0) tokens of each row.
    """
    model = Llama(config, policy, dtype=dtype, param_dtype=dtype)
    hidden, layers = model.apply(params, tokens, positions, kv_state.layers, ctx, policy_params)
    if logits_at is not None:
        hidden = jnp.take_along_axis(hidden, logits_at[:, None, None], axis=1)[:, 0]
    logits = model.apply(params, hidden, method=Llama.logits)
    lengths = jnp.maximum(kv_state.lengths, jnp.max(positions, axis=1) + 1)
    return logits, kv_state.replace(layers=layers, lengths=lengths)


def hidden_states(params, tokens, positions, kv_state, *, config, policy, ctx, dtype=jnp.float32, policy_params=None):
    """Like `forward` but returns the final normed hidden states [B, T, D] (for chunked
    log-likelihoods without materialising [B, T, V])."""
    model = Llama(config, policy, dtype=dtype, param_dtype=dtype)
    hidden, layers = model.apply(params, tokens, positions, kv_state.layers, ctx, policy_params)
    lengths = jnp.maximum(kv_state.lengths, jnp.max(positions, axis=1) + 1)
    return hidden, kv_state.replace(layers=layers, lengths=lengths)


def logits_from_hidden(params, hidden, *, config: LlamaConfig, dtype=jnp.float32):
    """hidden [..., D] -> float32 logits [..., V]."""
    from kvjax.policies.dense import Dense

    return Llama(config, Dense(), dtype=dtype, param_dtype=dtype).apply(params, hidden, method=Llama.logits)
