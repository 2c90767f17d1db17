"""Shared-context sessions: compress a context once, then ask it several questions.

    res = run_session(model, policy, contexts, turns, mode="inside")

contexts: per row the context token ids; turns: per row a list of token-id pieces, one
per turn (turn t's piece is the previous turn's gold answer, if any, and question t).
mode "inside": the context and the first question are prefilled (and compressed) together
(what `kvjax.generate` does with the whole prompt); "excluded": only the context is
prefilled and compressed, the first question is appended afterwards (kvpress's default
pipeline). Every later piece is appended to the compressed state through the policy's
decode step (T tokens at once where that is the same as T single steps, else one token at
a time), each turn's answer is decoded greedily from a copy of the state, and the state
kept for the next turn holds the gold answer, never the model's (no error propagation).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..generation import bucket_length, decode, prefill
from ..models.forward import forward
from ..policies.adakv import AdaKV
from ..policies.base import Policy
from ..policies.eviction import EvictionPolicy
from ..sampling import Sampler
from ..state import LayerContext
from .shared import apply_policy, capture, shares_prefill

MODES = ("inside", "excluded")
_SAFE_DECODES = (Policy.decode, EvictionPolicy.decode, AdaKV.decode)


def appends_in_chunks(policy) -> bool:
    """True when appending T tokens in one decode call equals T single decode steps."""
    return not policy.evicts_on_decode and type(policy).decode in _SAFE_DECODES


def pads_safely(policy) -> bool:
    """True when a decode step may carry padding tokens (position -1) for some rows."""
    return type(policy).decode in _SAFE_DECODES


@functools.partial(jax.jit, static_argnames=("config", "policy", "dtype", "chunked", "implementation"))
def _append(params, state, tokens, positions, *, config, policy, dtype, chunked, implementation=None):
    """Feed tokens [B, W] (left-padded: positions -1 first) through decode; logits at the
    last column [B, V] and the new state."""
    b, w = tokens.shape
    ctx = LayerContext(0, config, "decode", True, 0, w, implementation)
    last = jnp.full((b,), w - 1, jnp.int32)
    if chunked:
        return forward(
            params, tokens, positions, state, config=config, policy=policy, ctx=ctx, dtype=dtype, logits_at=last
        )

    def step(carry, xs):
        st, _ = carry
        logits, st = forward(
            params,
            xs[0][:, None],
            xs[1][:, None],
            st,
            config=config,
            policy=policy,
            ctx=ctx,
            dtype=dtype,
            logits_at=jnp.zeros((b,), jnp.int32),
        )
        return (st, logits), None

    init = (state, jnp.zeros((b, config.vocab_size), jnp.float32))
    (state, logits), _ = jax.lax.scan(step, init, (tokens.T, positions.T))
    return logits, state


def append_tokens(model, state, pieces: list[list[int]], policy, width: int | None = None, implementation=None):
    """Append one token piece per row to `state` (rows left-padded to a common width, a
    multiple of 16 unless `width` is given). Returns (logits after each row's last token
    [B, V], new state)."""
    b = len(pieces)
    if any(not p for p in pieces):
        raise ValueError("every row needs at least one token to append")
    n = max(len(p) for p in pieces)
    w = width or (n if b == 1 else -(-n // 16) * 16)
    if w < n:
        raise ValueError(f"width={w} is smaller than the longest piece ({n} tokens)")
    if b > 1 and w > min(len(p) for p in pieces) and not pads_safely(policy):
        raise ValueError(f"policy {policy.spec()!r} cannot take padded decode steps; append one row at a time")
    toks = np.full((b, w), model.config.pad_id, np.int32)
    pos = np.full((b, w), -1, np.int32)
    lengths = np.asarray(state.lengths)
    for i, p in enumerate(pieces):
        toks[i, w - len(p) :] = p
        pos[i, w - len(p) :] = lengths[i] + np.arange(len(p))
    return _append(
        model.params,
        state,
        jnp.asarray(toks),
        jnp.asarray(pos),
        config=model.config,
        policy=policy,
        dtype=model.dtype,
        chunked=appends_in_chunks(policy),
        implementation=implementation,
    )


@dataclasses.dataclass
class SessionResult:
    """outputs[row][turn]: generated texts; kv_bytes / dense_kv_bytes: per row, after the
    context prefill; times in seconds for the whole batch (capture shared by policies)."""

    outputs: list[list[str]]
    kv_bytes: float
    dense_kv_bytes: float
    capture_s: float
    compress_s: float
    append_s: float
    decode_s: float


def headroom_for(turns: list[list[list[int]]], answer_tokens: int) -> int:
    """Decode slots a session needs (appended pieces padded to 16, answers), rounded up to
    a multiple of 128 so most sessions share one compiled state shape."""
    need = sum(-(-max(len(r[t]) for r in turns) // 16) * 16 for t in range(len(turns[0]))) + answer_tokens
    return -(-need // 128) * 128


def prefill_ids(contexts, turns, mode: str) -> list[list[int]]:
    """The token ids prefilled under the policy for each row."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    return [list(c) + (list(t[0]) if mode == "inside" else []) for c, t in zip(contexts, turns)]


def capture_batch(model, ids: list[list[int]], implementation=None):
    """Dense capture of right-padded rows; returns (first logits, captured state, seconds)."""
    width = bucket_length(max(len(i) for i in ids))
    toks = np.full((len(ids), width), model.config.pad_id, np.int32)
    for r, i in enumerate(ids):
        toks[r, : len(i)] = i
    t0 = time.perf_counter()
    logits, cap = capture(model, toks, [len(i) for i in ids], implementation)
    jax.block_until_ready(logits)
    return logits, cap, time.perf_counter() - t0


def run_session(
    model, policy, contexts, turns, mode: str = "inside", answer_tokens: int = 8, captured=None, implementation=None
) -> SessionResult:
    """Answer every turn of every row (see module doc). `captured`: the result of
    `capture_batch` on `prefill_ids(contexts, turns, mode)`, which a caller running several
    policies that `shares_prefill` on the same rows computes once for all of them (the capture
    records each layer's queries and key mass, so it costs more than one plain prefill);
    without it, or for another policy, the policy prefills the rows itself (the same state)."""
    ids = prefill_ids(contexts, turns, mode)
    cfg = model.config
    if (
        max(len(i) for i in ids) + sum(max(len(r[t]) for r in turns) for t in range(len(turns[0]))) + answer_tokens
        > cfg.max_position
    ):
        raise ValueError(
            f"session of {max(len(i) for i in ids)} context tokens plus questions exceeds the model's "
            f"max_position={cfg.max_position}"
        )
    headroom = headroom_for(turns, answer_tokens)
    capture_s = 0.0
    t0 = time.perf_counter()
    if captured is not None and shares_prefill(policy):
        logits, cap, capture_s = captured
        t0 = time.perf_counter()
        state = apply_policy(model, cap, policy, headroom, implementation)
    else:
        width = bucket_length(max(len(i) for i in ids))
        toks = np.full((len(ids), width), cfg.pad_id, np.int32)
        for r, i in enumerate(ids):
            toks[r, : len(i)] = i
        logits, state = prefill(
            model.params,
            jnp.asarray(toks),
            jnp.asarray([len(i) for i in ids], jnp.int32),
            config=cfg,
            policy=policy,
            max_new_tokens=headroom,
            dtype=model.dtype,
            implementation=implementation,
        )
    jax.block_until_ready(state)
    compress_s = time.perf_counter() - t0
    kv_bytes, dense = state.nbytes / len(ids), state.dense_nbytes(cfg) / len(ids)
    outputs = [[] for _ in ids]
    append_s = decode_s = 0.0
    for t in range(len(turns[0])):
        if t > 0 or mode == "excluded":
            t1 = time.perf_counter()
            logits, state = append_tokens(model, state, [r[t] for r in turns], policy, implementation=implementation)
            jax.block_until_ready(logits)
            append_s += time.perf_counter() - t1
        t1 = time.perf_counter()
        out, n_out, _ = decode(
            model.params,
            jax.tree.map(jnp.copy, state),  # decode donates its input; the next turn appends to `state`
            logits,
            jax.random.key(0),
            config=cfg,
            policy=policy,
            max_new_tokens=answer_tokens,
            sampler=Sampler(),
            stop_ids=tuple(model.tokenizer.eos_ids),
            dtype=model.dtype,
            implementation=implementation,
        )
        out, n_out = np.asarray(out), np.asarray(n_out)
        decode_s += time.perf_counter() - t1
        for r in range(len(ids)):
            outputs[r].append(model.tokenizer.decode(out[r, : n_out[r]]))
    return SessionResult(outputs, kv_bytes, dense, capture_s, compress_s, append_s, decode_s)
