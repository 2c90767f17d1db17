"""Continue from an existing KV state: feed more tokens at per-row offsets.

    logits, state = extend(params, state, tokens [B, T], lengths [B], offsets=None, ...)

Row b's tokens[b, :lengths[b]] go in at positions offsets[b], offsets[b] + 1, ... (default
offsets: `state.lengths`, right after what the row has seen); the rest of the row is padding
(position -1). Returns the logits after each row's last new token [B, V] and the new state;
the input state is not donated (a session keeps it and extends copies).

Two phases, because a policy's prompt-time and decode-time steps differ:

- ``phase="prefill"`` continues a prefill that is still uncompressed: the policy's prefill step
  as a middle chunk (`LayerContext.final=False`: append and attend, compress nothing). A dense
  prefix state continued this way equals one prefill of the concatenation, and a `SharedPrefix`
  or APE state prefills its rows this way.
- ``phase="decode"`` appends to a state after its prompt was compressed (a session's question,
  a speculative draft to verify): the policy's decode step, all T tokens in one call where that
  equals T single steps (`appends_in_chunks`), else one token at a time in a `lax.scan`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..models.forward import forward
from ..policies.adakv import AdaKV
from ..policies.base import Policy
from ..policies.eviction import EvictionPolicy
from ..state import KVState, LayerContext
from . import steps

PHASES = ("prefill", "decode")
_SAFE_DECODES = (Policy.decode, EvictionPolicy.decode, AdaKV.decode)


def _appends_like_dense(policy) -> bool:
    return type(policy).decode in _SAFE_DECODES or getattr(type(policy), "appends_like_dense", False)


def appends_in_chunks(policy) -> bool:
    """True when appending T tokens in one decode call equals T single decode steps."""
    return not policy.evicts_on_decode and _appends_like_dense(policy)


def pads_safely(policy) -> bool:
    """True when a decode step may carry padding tokens (position -1) for some rows."""
    return _appends_like_dense(policy)


@functools.partial(
    jax.jit, static_argnames=("config", "policy", "dtype", "phase", "chunked", "implementation", "new_turn")
)
def feed(
    params,
    state: KVState,
    tokens,
    positions,
    logits_at,
    *,
    config,
    policy,
    dtype,
    phase: str = "decode",
    chunked: bool = True,
    implementation=None,
    new_turn: bool = False,
):
    """tokens, positions [B, T] (-1 = padding) into `state`; logits at column logits_at [B].
    `chunked=False` (decode phase only) feeds one column per step. new_turn (decode phase): the
    tokens are a new question (`LayerContext.new_turn`; with chunked=False every column's step
    carries it). Returns (logits [B, V], state)."""
    b, t = tokens.shape
    if phase == "prefill":
        ctx = LayerContext(0, config, "prefill", False, int(t), 0, implementation)
        return forward(
            params, tokens, positions, state, config=config, policy=policy, ctx=ctx, dtype=dtype, logits_at=logits_at
        )
    ctx = LayerContext(0, config, "decode", True, 0, int(t), implementation, new_turn=new_turn)
    if chunked:
        logits, state = forward(
            params, tokens, positions, state, config=config, policy=policy, ctx=ctx, dtype=dtype, logits_at=logits_at
        )
        return logits, settle(policy, state, ctx)

    def step(carry, xs):
        st, kept = carry
        tok, pos, i = xs
        logits, st = forward(
            params,
            tok[:, None],
            pos[:, None],
            st,
            config=config,
            policy=policy,
            ctx=ctx,
            dtype=dtype,
            logits_at=jnp.zeros((b,), jnp.int32),
        )
        return (st, jnp.where((logits_at == i)[:, None], logits, kept)), None

    init = (state, jnp.zeros((b, config.vocab_size), jnp.float32))
    (state, logits), _ = jax.lax.scan(step, init, (tokens.T, positions.T, jnp.arange(t, dtype=jnp.int32)))
    return logits, settle(policy, state, ctx)


def settle(policy, state: KVState, ctx: LayerContext) -> KVState:
    """`state` after decode steps run outside `generate`'s loop, with what a step leaves pending
    (lazy eviction: `kvjax.policies.eviction`) applied by every layer's `Policy.maintain`, as the
    loop does when it stops. A policy with periodic upkeep (`maintenance_period` > 0: quantizers)
    is left as its steps left it: without `ctx.deferred` those steps did their upkeep."""
    if steps.maintenance_period(policy, ctx) > 0:
        return state
    return steps.maintain_state(policy, state, ctx)


def extend(
    params,
    state: KVState,
    tokens,
    lengths,
    offsets=None,
    *,
    config,
    policy,
    dtype=jnp.float32,
    phase: str = "decode",
    implementation=None,
):
    """Feed right-padded tokens [B, T] (true counts lengths [B], each >= 1) into `state` at
    per-row offsets (module doc). Returns (logits after each row's last token [B, V], state).

    Raises ValueError for an unknown phase, a row without tokens, rows of unequal lengths under
    a policy whose decode step cannot take padding (`pads_safely`), or more tokens than a
    row's position budget (`config.max_position`)."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r}; expected one of {PHASES}")
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[0] != state.lengths.shape[0]:
        raise ValueError(f"tokens of shape {tokens.shape} must be [B, T] with B = {state.lengths.shape[0]} rows")
    b, t = tokens.shape
    n = np.asarray(lengths, np.int64).reshape(-1)
    if n.shape != (b,) or (n < 1).any() or (n > t).any():
        raise ValueError(f"lengths={n.tolist()} must give 1..{t} tokens for each of the {b} rows")
    start = np.asarray(state.lengths if offsets is None else offsets, np.int64).reshape(-1)
    if start.shape != (b,) or (start < 0).any():
        raise ValueError(f"offsets={start.tolist()} must be {b} positions >= 0")
    if (start + n > config.max_position).any():
        raise ValueError(
            f"positions up to {int((start + n).max())} exceed the model's max_position={config.max_position}"
        )
    if phase == "decode" and b > 1 and len(set(n.tolist())) > 1 and not pads_safely(policy):
        raise ValueError(f"policy {policy.spec()!r} cannot take padded decode steps; extend one row at a time")
    cols = np.arange(t)[None, :]
    pos = np.where(cols < n[:, None], start[:, None] + cols, -1).astype(np.int32)
    return feed(
        params,
        state,
        tokens,
        jnp.asarray(pos),
        jnp.asarray(n - 1, jnp.int32),
        config=config,
        policy=policy,
        dtype=dtype,
        phase=phase,
        chunked=phase == "prefill" or appends_in_chunks(policy),
        implementation=implementation,
    )


def pad_rows(pieces, pad_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token-id lists -> (right-padded tokens [B, W] int32, lengths [B]); W is the longest
    piece rounded up to `multiple` (a few widths share one compiled program)."""
    if not pieces or any(len(p) == 0 for p in pieces):
        raise ValueError("every row needs at least one token")
    n = max(len(p) for p in pieces)
    w = -(-n // multiple) * multiple
    out = np.full((len(pieces), w), pad_id, np.int32)
    for i, p in enumerate(pieces):
        out[i, : len(p)] = p
    return out, np.asarray([len(p) for p in pieces], np.int32)
