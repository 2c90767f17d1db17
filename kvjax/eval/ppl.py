"""Perplexity with a policy active: the one definition `kvjax eval`, `kvjax sweep` and the
benchmarks use.

Protocol (the same for every method, dense included): the first `prefix` tokens (half by
default) are prefilled, and compressed by the policy; the remaining tokens are teacher-forced
through the policy's decode step; the perplexity is over those remaining tokens, the first of
them scored from the prefill logits. This measures the compressed cache the way generation
uses it.

Two ways to save work that leave the numbers unchanged: policies that `shares_prefill` can
build their states from one dense capture of the prefix (`capture_prefix`, worth it for several
such policies on one text), and where appending T tokens in one decode call equals T single
steps (`appends_in_chunks`) the tokens are fed `chunk` at a time instead of one by one.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..generation import prefill
from ..models.forward import forward
from ..policies.registry import parse_policy
from ..state import LayerContext
from .session import appends_in_chunks, capture_batch
from .shared import apply_policy, shares_prefill


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


@functools.partial(jax.jit, static_argnames=("config", "policy", "dtype", "implementation"))
def _chunk_nll(params, state, fed, positions, targets, *, config, policy, dtype, implementation=None):
    """Feed fed [B, C] at positions [B, C] (-1 = padding); summed NLL of targets [B, C]."""
    ctx = LayerContext(0, config, "decode", True, 0, fed.shape[1], implementation)
    logits, state = forward(params, fed, positions, state, config=config, policy=policy, ctx=ctx, dtype=dtype)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(positions >= 0, nll, 0.0), axis=1), state


def _tokens_and_prefix(tokens, prefix: int | None):
    toks = np.atleast_2d(np.asarray(tokens, np.int32))
    n = toks.shape[1]
    prefix = n // 2 if prefix is None else prefix
    if not 1 <= prefix < n:
        raise ValueError(f"prefix={prefix} must be in [1, {n - 1}] for a text of {n} tokens")
    return toks, prefix


def capture_prefix(model, tokens, prefix: int | None = None, implementation: str | None = None):
    """The dense capture of the prefix of tokens [N] or [B, N] (`session.capture_batch`),
    to be passed as `captured` to `perplexity` for every policy that `shares_prefill`."""
    toks, prefix = _tokens_and_prefix(tokens, prefix)
    return capture_batch(model, [list(r) for r in toks[:, :prefix]], implementation)


def text_window(tokenizer, haystack: str, context: int, seed: int) -> list[int]:
    """The `context` tokens of `haystack` scored by the "ppl" task, starting at an offset
    drawn from `seed`."""
    ids = tokenizer.encode(haystack)
    if len(ids) < context:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than context={context}")
    start = int(np.random.default_rng(seed).integers(0, len(ids) - context + 1))
    return ids[start : start + context]


def perplexity(
    model,
    tokens,
    policy,
    prefix: int | None = None,
    captured=None,
    chunk: int = 256,
    implementation: str | None = None,
) -> dict:
    """tokens [N] or [B, N]; policy: a Policy or a spec string; prefix: tokens prefilled (N // 2
    by default); captured: `capture_prefix(model, tokens, prefix)`, shared by the policies
    that `shares_prefill` (without it the policy prefills the prefix itself); chunk: tokens fed per
    decode call where the policy `appends_in_chunks` (1: one at a time).

    Returns {'ppl', 'nll', 'scored_tokens', 'kv_bytes', 'dense_kv_bytes', 'compression_ratio',
    'prefill_s', 'decode_s'}: bytes of the state right after the prefix prefill (with its
    decode headroom), seconds of the prefill (capture included) and of the scored part."""
    policy = parse_policy(policy) if isinstance(policy, str) else policy
    toks, prefix = _tokens_and_prefix(tokens, prefix)
    b, n = toks.shape
    if n > model.config.max_position:
        raise ValueError(f"text of {n} tokens exceeds the model's max_position={model.config.max_position}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    rest = n - prefix
    chunked = chunk > 1 and appends_in_chunks(policy)
    headroom = rest + chunk if chunked else rest
    common = dict(config=model.config, policy=policy, dtype=model.dtype, implementation=implementation)
    t0 = time.perf_counter()
    capture_s = 0.0
    if captured is not None and shares_prefill(policy):
        first, cap, capture_s = captured
        t0 = time.perf_counter()
        state = apply_policy(model, cap, policy, headroom, implementation)
    else:
        first, state = prefill(
            model.params,
            jnp.asarray(toks[:, :prefix]),
            jnp.full((b,), prefix, jnp.int32),
            max_new_tokens=headroom,
            **common,
        )
    jax.block_until_ready(first)
    kv_bytes, dense = state.nbytes, state.dense_nbytes(model.config)
    t1 = time.perf_counter()
    targets = toks[:, prefix:]
    if chunked:
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
