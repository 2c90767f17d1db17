"""The jit-compiled steps of generation: prefill a prompt batch, then decode in a while loop.

    first_logits, state = prefill(params, tokens [B, Tb], lengths [B], ...)
    tokens_out, n_out, state = decode(params, state, first_logits, key, limit, ...)

Every static argument is hashable configuration; everything that changes from call to call
is an array, so a new prompt of a similar length, or a new `limit` within the same
`max_new_tokens` bucket, reuses the compiled program. `decode` donates its input state: the
loop updates the cache in place and the caller's `state` is deleted (pass a copy to keep it).
`decode_start` / `decode_steps` split `decode` so a host loop can stream tokens chunk by chunk
with the same loop body (and the same tokens). `policy_params` (None by default) is a traced
pytree of policy parameters handed to `forward` (MatryoshkaKV's projections).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from .. import host
from ..models.config import LlamaConfig
from ..models.forward import forward, hidden_states, logits_from_hidden
from ..policies.base import Policy
from ..sampling import Sampler
from ..state import KVState, LayerContext

#: Smallest static decode length: `max_new_tokens` from 1 to 16 share one program.
MIN_NEW_TOKENS_BUCKET = 16


def bucket_length(n: int, minimum: int = 32, multiple: int | None = None) -> int:
    """Static prompt length for n tokens: next power of two >= n (>= minimum), or the
    next multiple of `multiple` when given."""
    if multiple:
        return max(multiple, -(-n // multiple) * multiple)
    b = minimum
    while b < n:
        b *= 2
    return b


def new_tokens_bucket(n: int) -> int:
    """Static decode length (output buffer and cache headroom) for `max_new_tokens=n`: the
    next power of two >= n, at least MIN_NEW_TOKENS_BUCKET. The loop bound itself is traced,
    so every n within one bucket runs the same compiled programs."""
    return bucket_length(n, minimum=MIN_NEW_TOKENS_BUCKET)


def prompt_positions(lengths: jax.Array, width: int, offset: int = 0) -> jax.Array:
    """Positions [B, width] for tokens offset..offset+width-1, -1 beyond each row's length."""
    pos = offset + jnp.arange(width, dtype=jnp.int32)[None, :]
    return jnp.where(pos < lengths[:, None], pos, -1)


@functools.partial(
    jax.jit,
    static_argnames=("config", "policy", "max_new_tokens", "prefill_chunk", "dtype", "implementation", "longest"),
)
def prefill(
    params,
    tokens,
    lengths,
    *,
    config: LlamaConfig,
    policy: Policy,
    max_new_tokens: int,
    prefill_chunk: int | None = None,
    dtype=jnp.float32,
    implementation: str | None = None,
    longest: int | None = None,
    policy_params=None,
):
    """Run the prompt tokens [B, Tb] (right-padded; true lengths [B]) through the model.

    max_new_tokens: the decode headroom the state keeps (static). prefill_chunk: run the
    prompt in chunks of this many tokens (Sarathi-Serve's chunked prefill; Tb must be a
    multiple of it), so activations are O(chunk) instead of O(Tb). longest: a static bound
    on max(lengths) (`kvjax.state.bound_length`; None: Tb) that compressed states are sized
    from (`LayerContext.prompt_bound`); it must not be below a row's true length.
    Returns (logits at each row's last prompt token [B, V] float32, KVState)."""
    b, tb = tokens.shape
    state = policy.init_state(config, b, tb, max_new_tokens, dtype)
    ctx = LayerContext(0, config, "prefill", True, tb, max_new_tokens, implementation, longest or 0)
    if not prefill_chunk or prefill_chunk >= tb:
        pos = prompt_positions(lengths, tb)
        logits, state = forward(
            params,
            tokens,
            pos,
            state,
            config=config,
            policy=policy,
            ctx=dataclasses.replace(ctx, prefix_cache=True),  # the whole prompt into the empty state
            dtype=dtype,
            logits_at=jnp.maximum(lengths - 1, 0),
            policy_params=policy_params,
        )
        return logits, state
    if tb % prefill_chunk:
        raise ValueError(f"prompt bucket {tb} must be a multiple of prefill_chunk={prefill_chunk}")
    n = tb // prefill_chunk
    chunks = tokens.reshape(b, n, prefill_chunk).swapaxes(0, 1)
    mid_ctx = dataclasses.replace(ctx, final=False)

    def run_chunk(carry, i, chunk, c):
        state, last_hidden = carry
        pos = prompt_positions(lengths, prefill_chunk, offset=i * prefill_chunk)
        h, state = hidden_states(
            params, chunk, pos, state, config=config, policy=policy, ctx=c, dtype=dtype, policy_params=policy_params
        )
        local = lengths - 1 - i * prefill_chunk
        here = (local >= 0) & (local < prefill_chunk)
        picked = jnp.take_along_axis(h, jnp.clip(local, 0, prefill_chunk - 1)[:, None, None], axis=1)[:, 0]
        return state, jnp.where(here[:, None], picked, last_hidden)

    last = jnp.zeros((b, config.hidden_size), dtype)
    if n > 1:

        def body(carry, xs):
            return run_chunk(carry, xs[0], xs[1], mid_ctx), None

        (state, last), _ = jax.lax.scan(body, (state, last), (jnp.arange(n - 1), chunks[:-1]))
    state, last = run_chunk((state, last), n - 1, chunks[-1], ctx)
    return logits_from_hidden(params, last, config=config, dtype=dtype), state


def layer_contexts(ctx: LayerContext, config: LlamaConfig) -> list[LayerContext]:
    """`ctx` for each layer (its index and its config: local / global layers differ)."""
    return [dataclasses.replace(ctx, layer=i, config=config.for_layer(i)) for i in range(config.num_layers)]


def maintenance_period(policy: Policy, ctx: LayerContext) -> int:
    """Decode steps between two `maintain_state` calls (the smallest positive
    `Policy.maintenance_period` over the layers; 0: the policy defers nothing)."""
    periods = [p for c in layer_contexts(ctx, ctx.config) if (p := policy.maintenance_period(c)) > 0]
    return min(periods) if periods else 0


def maintain_state(policy: Policy, state: KVState, ctx: LayerContext) -> KVState:
    """Every layer's `Policy.maintain` (the upkeep that decode steps run with `ctx.deferred` skip)."""
    layers = tuple(policy.maintain(layer, c) for layer, c in zip(state.layers, layer_contexts(ctx, ctx.config)))
    return state.replace(layers=layers)


@struct.dataclass
class DecodeLoop:
    """The carry of the decode loop (a pytree).

    step: tokens written so far (scalar); token [B]: last sampled token; out [B, max_new]
    (pad_id after a row stops); done [B]; n_out [B]: tokens produced per row (a stop token
    included); state: the KVState; key: the PRNG key the next step splits."""

    step: jax.Array
    token: jax.Array
    out: jax.Array
    done: jax.Array
    n_out: jax.Array
    state: KVState
    key: jax.Array


def _stops(stop_ids: tuple[int, ...]) -> jax.Array:
    return jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)


def _start(state, first_logits, key, *, config, max_new_tokens, sampler, stop_ids) -> DecodeLoop:
    """Sample each row's first token from the prefill logits."""
    b = first_logits.shape[0]
    key, sub = jax.random.split(key)
    tok = sampler(first_logits, sub)
    out = jnp.full((b, max_new_tokens), config.pad_id, jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, _stops(stop_ids))
    return DecodeLoop(jnp.ones((), jnp.int32), tok, out, done, jnp.ones((b,), jnp.int32), state, key)


def _run(
    params, loop: DecodeLoop, until, *, config, policy, sampler, stop_ids, dtype, implementation, policy_params=None
) -> DecodeLoop:
    """Decode steps while `loop.step < until` (traced) and some row is still going."""
    b, max_new = loop.out.shape
    stops = _stops(stop_ids)
    ctx = LayerContext(0, config, "decode", True, 0, max_new, implementation)
    until = jnp.minimum(jnp.asarray(until, jnp.int32), max_new)
    # Upkeep a policy defers to every `period` steps (a quantizer's flush): the loop runs that many
    # steps with ctx.deferred set, then `maintain` on every layer (`Policy.maintenance_period`).
    period = maintenance_period(policy, ctx)
    plain_ctx = ctx
    if period:
        ctx = dataclasses.replace(ctx, deferred=True)

    # Host-resident leaves (`kvjax.host`) are read-only while decoding: loop-invariant operands
    # of the while_loop, outside its carry, so no step carries or rewrites a host buffer.
    carried, on_host, join = host.split_host(loop.state)

    def cond(s: DecodeLoop):
        return (s.step < until) & ~jnp.all(s.done)

    def body(s: DecodeLoop):
        state = join(s.state, on_host)
        logits, st = forward(
            params,
            s.token[:, None],
            state.lengths[:, None],
            state,
            config=config,
            policy=policy,
            ctx=ctx,
            dtype=dtype,
            logits_at=jnp.zeros((b,), jnp.int32),
            policy_params=policy_params,
        )
        if not host.unchanged_host_leaves(st, on_host):
            raise ValueError(f"policy {policy.spec()!r} rewrote a host-resident state leaf in a decode step")
        key, sub = jax.random.split(s.key)
        tok = jnp.where(s.done, config.pad_id, sampler(logits, sub))
        out = s.out.at[:, s.step].set(tok)
        n_out = s.n_out + (~s.done).astype(jnp.int32)
        done = s.done | jnp.isin(tok, stops)
        return DecodeLoop(s.step + 1, tok, out, done, n_out, host.split_host(st)[0], key)

    def maintain(s: DecodeLoop) -> DecodeLoop:
        state = maintain_state(policy, join(s.state, on_host), plain_ctx)
        return s.replace(state=host.split_host(state)[0])

    def maintained(s: DecodeLoop):
        """`period` steps (fewer when the loop ends), then every layer's `maintain`."""
        _, s = jax.lax.while_loop(
            lambda c: (c[0] < period) & cond(c[1]), lambda c: (c[0] + 1, body(c[1])), (jnp.zeros((), jnp.int32), s)
        )
        return maintain(s)

    if max_new == 1:
        return loop
    final = jax.lax.while_loop(cond, maintained if period else body, loop.replace(state=carried))
    if not period:  # upkeep a policy leaves to the end of a run (none by default)
        final = maintain(final)
    return final.replace(state=join(final.state, on_host))


_DECODE_STATIC = ("config", "policy", "max_new_tokens", "sampler", "stop_ids", "dtype", "implementation")


@functools.partial(jax.jit, static_argnames=_DECODE_STATIC, donate_argnames=("state",))
def decode(
    params,
    state: KVState,
    first_logits,
    key,
    limit=None,
    *,
    config: LlamaConfig,
    policy: Policy,
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: tuple[int, ...],
    dtype=jnp.float32,
    implementation: str | None = None,
    policy_params=None,
):
    """Sample up to `limit` tokens per row (default and at most `max_new_tokens`) with a
    `lax.while_loop`; a row stops after a token in `stop_ids`.

    max_new_tokens is static (the output width); limit is traced, so any limit up to it
    reuses the compiled loop. `state` is donated (deleted on return).
    Returns (tokens [B, max_new_tokens] int32 (pad_id after a row stops or past `limit`),
    n_out [B], KVState)."""
    loop = _start(
        state, first_logits, key, config=config, max_new_tokens=max_new_tokens, sampler=sampler, stop_ids=stop_ids
    )
    loop = _run(
        params,
        loop,
        max_new_tokens if limit is None else limit,
        config=config,
        policy=policy,
        sampler=sampler,
        stop_ids=stop_ids,
        dtype=dtype,
        implementation=implementation,
        policy_params=policy_params,
    )
    return loop.out, loop.n_out, loop.state


@functools.partial(
    jax.jit, static_argnames=("config", "max_new_tokens", "sampler", "stop_ids"), donate_argnames=("state",)
)
def decode_start(
    state: KVState, first_logits, key, *, config: LlamaConfig, max_new_tokens: int, sampler: Sampler, stop_ids
) -> DecodeLoop:
    """The first step of `decode` (sample from the prefill logits) as a `DecodeLoop` that
    `decode_steps` continues. `state` is donated."""
    return _start(
        state, first_logits, key, config=config, max_new_tokens=max_new_tokens, sampler=sampler, stop_ids=stop_ids
    )


@functools.partial(
    jax.jit,
    static_argnames=("config", "policy", "sampler", "stop_ids", "dtype", "implementation"),
    donate_argnames=("loop",),
)
def decode_steps(
    params,
    loop: DecodeLoop,
    until,
    *,
    config: LlamaConfig,
    policy: Policy,
    sampler: Sampler,
    stop_ids: tuple[int, ...],
    dtype=jnp.float32,
    implementation: str | None = None,
    policy_params=None,
) -> DecodeLoop:
    """Continue `loop` until `loop.step == until` (traced) or every row is done; the loop
    body is `decode`'s, so the tokens equal `decode`'s. `loop` is donated."""
    return _run(
        params,
        loop,
        until,
        config=config,
        policy=policy,
        sampler=sampler,
        stop_ids=stop_ids,
        dtype=dtype,
        implementation=implementation,
        policy_params=policy_params,
    )
