"""jit-compiled generation: prefill (optionally chunked) then a `lax.while_loop` decode.

Low level (arrays in, arrays out, all static configuration hashable):
    first_logits, state = prefill(params, tokens [B, Tb], lengths [B], ...)
    tokens_out, n_out, state = decode(params, state, first_logits, key, ...)
High level: `generate(model, prompts, policy=..., ...)` tokenizes, buckets prompt
lengths (so new prompt contents never recompile), times both phases and decodes text.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
import types
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .models.config import LlamaConfig
from .models.forward import forward, hidden_states, logits_from_hidden
from .policies.base import Policy
from .policies.registry import parse_policy
from .sampling import Sampler
from .state import KVState, LayerContext


def bucket_length(n: int, minimum: int = 32, multiple: int | None = None) -> int:
    """Static prompt length for n tokens: next power of two >= n (>= minimum), or the
    next multiple of `multiple` when given."""
    if multiple:
        return max(multiple, -(-n // multiple) * multiple)
    b = minimum
    while b < n:
        b *= 2
    return b


def prompt_positions(lengths: jax.Array, width: int, offset: int = 0) -> jax.Array:
    """Positions [B, width] for tokens offset..offset+width-1, -1 beyond each row's length."""
    pos = offset + jnp.arange(width, dtype=jnp.int32)[None, :]
    return jnp.where(pos < lengths[:, None], pos, -1)


@functools.partial(
    jax.jit,
    static_argnames=("config", "policy", "max_new_tokens", "prefill_chunk", "dtype", "implementation"),
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
):
    """Run the prompt tokens [B, Tb] (right-padded; true lengths [B]) through the model.

    Returns (logits at each row's last prompt token [B, V] float32, KVState)."""
    b, tb = tokens.shape
    state = policy.init_state(config, b, tb, max_new_tokens, dtype)
    ctx = LayerContext(0, config, "prefill", True, tb, max_new_tokens, implementation)
    if not prefill_chunk or prefill_chunk >= tb:
        pos = prompt_positions(lengths, tb)
        logits, state = forward(
            params,
            tokens,
            pos,
            state,
            config=config,
            policy=policy,
            ctx=ctx,
            dtype=dtype,
            logits_at=jnp.maximum(lengths - 1, 0),
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
        h, state = hidden_states(params, chunk, pos, state, config=config, policy=policy, ctx=c, dtype=dtype)
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


@struct.dataclass
class _Loop:
    step: jax.Array
    token: jax.Array  # [B] last sampled token
    out: jax.Array  # [B, max_new]
    done: jax.Array  # [B] bool
    n_out: jax.Array  # [B] tokens produced (stop token included)
    state: KVState
    key: jax.Array


@functools.partial(
    jax.jit,
    static_argnames=("config", "policy", "max_new_tokens", "sampler", "stop_ids", "dtype", "implementation"),
)
def decode(
    params,
    state: KVState,
    first_logits,
    key,
    *,
    config: LlamaConfig,
    policy: Policy,
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: tuple[int, ...],
    dtype=jnp.float32,
    implementation: str | None = None,
):
    """Sample up to `max_new_tokens` tokens per row with a `lax.while_loop`.

    Returns (tokens [B, max_new] int32 (pad_id after a row stops), n_out [B], KVState)."""
    b = first_logits.shape[0]
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    ctx = LayerContext(0, config, "decode", True, 0, max_new_tokens, implementation)
    key, sub = jax.random.split(key)
    tok = sampler(first_logits, sub)
    done = jnp.isin(tok, stops)
    out = jnp.full((b, max_new_tokens), config.pad_id, jnp.int32).at[:, 0].set(tok)
    loop = _Loop(jnp.ones((), jnp.int32), tok, out, done, jnp.ones((b,), jnp.int32), state, key)

    def cond(s: _Loop):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: _Loop):
        pos = s.state.lengths[:, None]
        logits, st = forward(
            params,
            s.token[:, None],
            pos,
            s.state,
            config=config,
            policy=policy,
            ctx=ctx,
            dtype=dtype,
            logits_at=jnp.zeros((b,), jnp.int32),
        )
        key, sub = jax.random.split(s.key)
        tok = sampler(logits, sub)
        tok = jnp.where(s.done, config.pad_id, tok)
        out = s.out.at[:, s.step].set(tok)
        n_out = s.n_out + (~s.done).astype(jnp.int32)
        done = s.done | jnp.isin(tok, stops)
        return _Loop(s.step + 1, tok, out, done, n_out, st, key)

    if max_new_tokens > 1:
        loop = jax.lax.while_loop(cond, body, loop)
    return loop.out, loop.n_out, loop.state


@dataclasses.dataclass
class GenerateOutput:
    """texts: decoded continuations; tokens: [B, max_new] ids; n_tokens: per row;
    state: final KVState; stats: timings (s), tokens/s, KV bytes."""

    texts: list[str]
    tokens: np.ndarray
    n_tokens: np.ndarray
    state: KVState
    stats: dict


def encode_batch(tokenizer, prompts: Sequence[str], chat: bool, bucket_multiple: int | None = None):
    ids = []
    for p in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": p}]) if chat else p
        toks = tokenizer.encode(text)
        if not toks:
            raise ValueError(f"prompt {p!r} encodes to zero tokens")
        ids.append(toks)
    width = bucket_length(max(len(t) for t in ids), multiple=bucket_multiple)
    return ids, width


def prepare_request(model, prompts, policy, max_new_tokens: int, chat: bool, bucket_multiple: int | None = None):
    """Validate a generation request and tokenize it: returns (policy object, token id
    lists, bucketed width). Raises ValueError naming the bad value."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    pol = parse_policy(policy) if isinstance(policy, str) else policy
    ids, width = encode_batch(model.tokenizer, prompts, chat, bucket_multiple)
    longest = max(len(t) for t in ids)
    if longest + max_new_tokens > model.config.max_position:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
            f"max_position={model.config.max_position}"
        )
    return pol, ids, width


def generate(
    model,
    prompts: str | Sequence[str],
    *,
    policy: Policy | str = "dense",
    max_new_tokens: int = 64,
    sampler: Sampler = Sampler(),
    seed: int = 0,
    chat: bool = False,
    stop_ids: Sequence[int] | None = None,
    prefill_chunk: int | None = None,
    implementation: str | None = None,
) -> GenerateOutput:
    """Generate continuations for one prompt or a batch of prompts of any lengths.

    `policy` is a Policy or a spec string ("snapkv:budget=0.2"). Prompt lengths are
    bucketed, so a new prompt of a similar length reuses the compiled program."""
    pol, ids, width = prepare_request(model, prompts, policy, max_new_tokens, chat, prefill_chunk)
    cfg = model.config
    tokens = np.full((len(ids), width), cfg.pad_id, np.int32)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = t
    lengths = jnp.asarray([len(t) for t in ids], jnp.int32)
    stops = tuple(stop_ids) if stop_ids is not None else tuple(model.tokenizer.eos_ids)
    common = dict(
        config=cfg, policy=pol, max_new_tokens=max_new_tokens, dtype=model.dtype, implementation=implementation
    )
    t0 = time.perf_counter()
    logits, state = prefill(model.params, jnp.asarray(tokens), lengths, prefill_chunk=prefill_chunk, **common)
    jax.block_until_ready(logits)
    t1 = time.perf_counter()
    kv_bytes_after_prefill = state.nbytes
    out, n_out, state = decode(
        model.params, state, logits, jax.random.key(seed), sampler=sampler, stop_ids=stops, **common
    )
    out = np.asarray(jax.block_until_ready(out))
    t2 = time.perf_counter()
    n_out = np.asarray(n_out)
    texts = [model.tokenizer.decode(out[i, : n_out[i]]) for i in range(len(ids))]
    decoded = int(n_out.sum())
    stats = {
        "prompt_tokens": int(sum(len(t) for t in ids)),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "prefill_tokens_per_s": sum(len(t) for t in ids) / max(t1 - t0, 1e-9),
        "decode_tokens_per_s": max(decoded - len(ids), 0) / max(t2 - t1, 1e-9),
        "generated_tokens": decoded,
        "kv_bytes": state.nbytes,
        "kv_bytes_after_prefill": kv_bytes_after_prefill,
        "dense_kv_bytes": state.dense_nbytes(cfg),
        "policy": pol.spec(),
    }
    return GenerateOutput(texts, out, n_out, state, stats)


class _CallableModule(types.ModuleType):
    """Makes `kvjax.generate(model, prompts, ...)` call `generate` while `kvjax.generate.prefill`,
    `.decode` and `from kvjax.generate import ...` keep working (the module stays the module)."""

    def __call__(self, *args, **kwargs) -> GenerateOutput:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
