"""Perplexity with a policy active, on a shared dense capture of the prefix.

Same protocol and numbers as `kvjax.eval.metrics.perplexity` (first half prefilled and
compressed, second half teacher-forced through the decode step, the first scored token
from the prefill logits), two speed-ups that do not change the result: the prefix's dense
prefill is captured once for every policy that `shares_prefill`, and where appending T
tokens in one decode call equals T single steps (`appends_in_chunks`) the second half is
fed in chunks of `chunk` tokens instead of one at a time.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..generate import prefill
from ..models.forward import forward
from ..state import LayerContext
from .metrics import _teacher_forced_nll
from .session import appends_in_chunks, capture_batch
from .shared import apply_policy, shares_prefill


@functools.partial(jax.jit, static_argnames=("config", "policy", "dtype", "implementation"))
def _chunk_nll(params, state, fed, positions, targets, *, config, policy, dtype, implementation=None):
    """Feed fed [B, C] at positions [B, C] (-1 = padding); summed NLL of targets [B, C]."""
    ctx = LayerContext(0, config, "decode", True, 0, fed.shape[1], implementation)
    logits, state = forward(params, fed, positions, state, config=config, policy=policy, ctx=ctx, dtype=dtype)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(positions >= 0, nll, 0.0), axis=1), state


def prefix_of(tokens) -> np.ndarray:
    """The prefilled half [1, n // 2] of a text's tokens."""
    toks = np.atleast_2d(np.asarray(tokens, np.int32))
    return toks[:, : toks.shape[1] // 2]


def perplexity_fast(model, tokens, policy, captured=None, chunk: int = 256, implementation=None) -> dict:
    """tokens [N] or [1, N]. `captured`: `capture_batch(model, prefix_of(tokens))`, shared
    across policies. Returns metrics.perplexity's keys plus prefill_s / decode_s."""
    toks = np.atleast_2d(np.asarray(tokens, np.int32))
    b, n = toks.shape
    prefix = n // 2
    if n > model.config.max_position:
        raise ValueError(f"text of {n} tokens exceeds the model's max_position={model.config.max_position}")
    rest = n - prefix
    common = dict(config=model.config, policy=policy, dtype=model.dtype, implementation=implementation)
    t0 = time.perf_counter()
    capture_s = 0.0
    if shares_prefill(policy):
        if captured is None:
            captured = capture_batch(model, [list(r) for r in toks[:, :prefix]], implementation)
        first, cap, capture_s = captured
        t0 = time.perf_counter()
        state = apply_policy(model, cap, policy, rest + chunk, implementation)
    else:
        first, state = prefill(
            model.params,
            jnp.asarray(toks[:, :prefix]),
            jnp.full((b,), prefix, jnp.int32),
            max_new_tokens=rest + chunk,
            **common,
        )
    jax.block_until_ready(first)
    kv_bytes, dense = state.nbytes, state.dense_nbytes(model.config)
    t1 = time.perf_counter()
    targets = toks[:, prefix:]
    if appends_in_chunks(policy):
        nll = -np.asarray(jax.nn.log_softmax(first, axis=-1))[np.arange(b), targets[:, 0]].astype(np.float64)
        for s in range(0, rest - 1, chunk):
            fed = np.full((b, chunk), model.config.pad_id, np.int32)
            pos = np.full((b, chunk), -1, np.int32)
            nxt = np.zeros((b, chunk), np.int32)
            m = min(chunk, rest - 1 - s)
            fed[:, :m], nxt[:, :m] = targets[:, s : s + m], targets[:, s + 1 : s + 1 + m]
            pos[:, :m] = prefix + s + np.arange(m)
            part, state = _chunk_nll(
                model.params, state, jnp.asarray(fed), jnp.asarray(pos), jnp.asarray(nxt), **common
            )
            nll += np.asarray(part, np.float64)
    else:
        nll = np.asarray(_teacher_forced_nll(model.params, state, first, jnp.asarray(targets), **common), np.float64)
    if not np.all(np.isfinite(nll)):
        raise FloatingPointError(f"non-finite NLL under policy {policy.spec()}")
    mean = float(nll.sum() / (rest * b))
    return {
        "ppl": float(np.exp(mean)),
        "nll": mean,
        "scored_tokens": rest * b,
        "kv_bytes": kv_bytes,
        "dense_kv_bytes": dense,
        "compression_ratio": kv_bytes / max(dense, 1),
        "prefill_s": capture_s + t1 - t0,
        "decode_s": time.perf_counter() - t1,
    }
