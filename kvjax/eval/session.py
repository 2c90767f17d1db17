"""Shared-context sessions for `kvjax eval`: compress a context once, ask its questions turn by turn.

    res = run_session(model, policy, contexts, turns, mode="inside")

contexts: per row the context token ids; turns: per row a list of token-id pieces, one
per turn (turn t's piece is the previous turn's gold answer, if any, and question t).
mode "inside": the context and the first question are prefilled (and compressed) together
(what `kvjax.generate` does with the whole prompt); "excluded": only the context is
prefilled and compressed, the first question is appended afterwards (kvpress's default
pipeline). The turns run through `kvjax.Session` (one row per context): every later piece
is asked on a copy of the compressed state (`Session.ask`: appended by the policy's decode
step, T tokens at once where that is the same as T single steps, else one token at a time,
as a new turn, so retrieval and offload policies fetch for it) and its answer decoded
greedily; then it is appended to the kept state for good (`Session.extend`) when a turn
follows, so the state kept for the next turn holds the gold answer, never the model's (no
error propagation).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..generation import bucket_length
from ..generation.resume import appends_in_chunks, extend, feed, pads_safely
from ..session import PIECE_MULTIPLE, Session
from .shared import apply_policy, capture, shares_prefill

MODES = ("inside", "excluded")


@functools.partial(jax.jit, static_argnames=("config", "policy", "dtype", "chunked", "implementation"))
def _append(params, state, tokens, positions, *, config, policy, dtype, chunked, implementation=None):
    """Feed tokens [B, W] (positions [B, W], -1 = padding) through decode; logits at the
    last column [B, V] and the new state (`kvjax.generation.resume.feed`)."""
    last = jnp.full((tokens.shape[0],), tokens.shape[1] - 1, jnp.int32)
    return feed(
        params,
        state,
        tokens,
        positions,
        last,
        config=config,
        policy=policy,
        dtype=dtype,
        phase="decode",
        chunked=chunked,
        implementation=implementation,
    )


def append_tokens(model, state, pieces: list[list[int]], policy, width: int | None = None, implementation=None):
    """Append one token piece per row to `state` (`kvjax.generation.resume.extend`: rows
    right-padded to a common width, a multiple of 16 where the policy takes padding, unless
    `width` is given). Returns (logits after each row's last token [B, V], new state)."""
    if any(not p for p in pieces):
        raise ValueError("every row needs at least one token to append")
    n = max(len(p) for p in pieces)
    w = width or (-(-n // PIECE_MULTIPLE) * PIECE_MULTIPLE if pads_safely(policy) and len(pieces) > 1 else n)
    if w < n:
        raise ValueError(f"width={w} is smaller than the longest piece ({n} tokens)")
    toks = np.full((len(pieces), w), model.config.pad_id, np.int32)
    for i, p in enumerate(pieces):
        toks[i, : len(p)] = p
    return extend(
        model.params,
        state,
        toks,
        [len(p) for p in pieces],
        config=model.config,
        policy=policy,
        dtype=model.dtype,
        phase="decode",
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
        jax.block_until_ready(state)
        session = Session.from_state(
            model, state, logits, policy=policy, headroom=headroom, implementation=implementation
        )
    else:
        session = Session(
            model, ids, policy=policy, headroom=headroom, max_new_tokens=answer_tokens, implementation=implementation
        )
    compress_s = time.perf_counter() - t0
    state = session.state
    kv_bytes, dense = state.nbytes / len(ids), state.dense_nbytes(cfg) / len(ids)
    outputs = [[] for _ in ids]
    append_s = decode_s = 0.0
    n_turns = len(turns[0])
    for t in range(n_turns):
        piece = [r[t] for r in turns] if t > 0 or mode == "excluded" else None
        # The question goes to `ask` (a new turn: retrieval and offload policies fetch for it),
        # then into the kept history for the turns after it.
        answer = session.ask(piece, max_new_tokens=answer_tokens, stop_ids=tuple(model.tokenizer.eos_ids))
        append_s += answer.stats["append_s"]
        decode_s += answer.stats["decode_s"]
        if piece is not None and t + 1 < n_turns:
            t1 = time.perf_counter()
            session.extend(piece)
            append_s += time.perf_counter() - t1
        for r in range(len(ids)):
            outputs[r].append(answer.texts[r])
    session.close()
    return SessionResult(outputs, kv_bytes, dense, capture_s, compress_s, append_s, decode_s)


__all__ = [
    "MODES",
    "SessionResult",
    "append_tokens",
    "appends_in_chunks",  # kvjax.generation.resume's, re-exported for the eval modules
    "capture_batch",
    "headroom_for",
    "pads_safely",
    "prefill_ids",
    "run_session",
]
