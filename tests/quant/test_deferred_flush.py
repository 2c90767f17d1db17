"""The decode loop's deferred flush (`Policy.maintenance_period` / `maintain`,
`LayerContext.deferred`): `generate`'s loop runs T steps without quantizing, then flushes every
layer once. Checked against a host loop written from the schedule's definition, against the
per-token flush (the same blocks of the same tokens get quantized), and for the window bound."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_QUANT

from kvjax.generation import decode, prefill
from kvjax.models.forward import forward, init_params
from kvjax.policies import parse_policy
from kvjax.quant.base import QuantState
from kvjax.sampling import Sampler
from kvjax.state import LayerContext

SPECS = ["kivi:bits=2,group=16,residual=16", "snapkv:budget=0.5,window=8+kivi:bits=4,group=16,residual=16"]
PROMPT, NEW = 45, 70  # 70 new tokens: four maintenances of T = 16 and a partial period


def _prefill(params, cfg, pol, tokens, lengths):
    return prefill(params, tokens, lengths, config=cfg, policy=pol, max_new_tokens=NEW)


def _inputs(cfg, batch=2):
    tokens = jax.random.randint(jax.random.key(3), (batch, 48), 3, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([PROMPT, 31][:batch], jnp.int32)
    return tokens, lengths


def _host_loop(params, cfg, pol, state, logits, *, deferred: bool):
    """Greedy decoding one `forward` call per token; with `deferred`, `maintain` on every layer
    after every T-th step and at the end, else the per-token flush inside `decode`."""
    ctx = LayerContext(0, cfg, "decode", True, 0, NEW, deferred=deferred)
    t = pol.maintenance_period(ctx)
    out = [jnp.argmax(logits, -1)]
    for i in range(1, NEW):
        tok = out[-1]
        logits, state = forward(
            params, tok[:, None], state.lengths[:, None], state, config=cfg, policy=pol, ctx=ctx,
            logits_at=jnp.zeros(tok.shape, jnp.int32),
        )  # fmt: skip
        out.append(jnp.argmax(logits, -1))
        if deferred and (i % t == 0 or i == NEW - 1):
            layers = tuple(
                pol.maintain(layer, dataclasses.replace(ctx, layer=j)) for j, layer in enumerate(state.layers)
            )
            state = state.replace(layers=layers)
        for layer in state.layers:
            assert int(jnp.max(layer.res_len)) <= layer.res_k.shape[2]
    return jnp.stack(out, 1), state


@pytest.fixture(scope="module")
def params():
    return init_params(TINY_QUANT, jax.random.key(0))


@pytest.mark.parametrize("spec", SPECS)
def test_decode_loop_follows_the_deferred_schedule(params, spec):
    """`decode` (the jitted nested loop) = a host loop that flushes after every T steps."""
    cfg, pol = TINY_QUANT, parse_policy(spec)
    tokens, lengths = _inputs(cfg)
    logits, state = _prefill(params, cfg, pol, tokens, lengths)
    assert pol.maintenance_period(LayerContext(0, cfg, "decode")) == 16
    ref_tokens, ref_state = _host_loop(params, cfg, pol, state, logits, deferred=True)
    logits, state = _prefill(params, cfg, pol, tokens, lengths)
    out, _, got = decode(
        params, state, logits, jax.random.key(0), config=cfg, policy=pol, max_new_tokens=NEW, sampler=Sampler(),
        stop_ids=(),
    )  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_tokens))
    for a, b in zip(got.layers, ref_state.layers):  # the schedule exactly; values up to jit-vs-eager rounding
        for x, y in ((a.res_len, b.res_len), (a.res_pos, b.res_pos), (a.streams[0].count, b.streams[0].count)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        np.testing.assert_allclose(np.asarray(a.res_k), np.asarray(b.res_k), rtol=1e-4, atol=1e-5)
        for x, y in zip(jax.tree.leaves(a.streams[0].data), jax.tree.leaves(b.streams[0].data)):
            if jnp.issubdtype(x.dtype, jnp.floating):  # scales and zeros: stored rounded to 16 bits
                np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=2e-3, atol=1e-4)
            else:  # packed codes: a code may flip where a scale rounds the other way
                assert np.mean(np.asarray(x) == np.asarray(y)) > 0.97
    counts = np.asarray(got.layers[0].streams[0].count)
    assert counts.min() > 0 and (counts % 16 == 0).all()  # flushes ran, whole blocks only


def test_deferred_and_per_token_flush_quantize_the_same_blocks(params):
    """One layer (its keys and values depend on the tokens alone), the same forced tokens: after
    a maintenance, the deferred schedule's quantized streams and residual window equal the
    per-token flush's, so deferring changes only when a block is quantized, never which."""
    cfg = dataclasses.replace(TINY_QUANT, name="tiny-quant-1l", num_layers=1)
    p1 = init_params(cfg, jax.random.key(1))
    pol = parse_policy(SPECS[0])
    tokens, lengths = _inputs(cfg, batch=1)
    forced = jax.random.randint(jax.random.key(5), (1, 64), 3, cfg.vocab_size, jnp.int32)
    states = []
    for deferred in (False, True):
        _, state = _prefill(p1, cfg, pol, tokens, lengths)
        ctx = LayerContext(0, cfg, "decode", True, 0, NEW, deferred=deferred)
        for i in range(64):
            _, state = forward(
                p1, forced[:, i : i + 1], state.lengths[:, None], state, config=cfg, policy=pol, ctx=ctx,
                logits_at=jnp.zeros((1,), jnp.int32),
            )  # fmt: skip
            if deferred and (i + 1) % 16 == 0:
                state = state.replace(layers=(pol.maintain(state.layers[0], ctx),))
        if not deferred:  # the per-token schedule flushes a full window at the next token's start
            state = state.replace(layers=(pol.maintain(state.layers[0], ctx),))
        states.append(state.layers[0])
    per_token, deferred = states
    assert isinstance(per_token, QuantState)
    for a, b in zip(jax.tree.leaves(per_token), jax.tree.leaves(deferred)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_window_holds_two_blocks_beyond_the_residual(params):
    """W = R + 2T for long rows (room for T deferred appends after a flush leaves R + T), and just
    the tokens a short row can ever hold."""
    pol = parse_policy(SPECS[0])
    ctx = LayerContext(0, TINY_QUANT, "decode", True, 0, NEW)
    assert pol.residual_window(1000, ctx) == 16 + 2 * 16
    short = dataclasses.replace(ctx, max_new_tokens=4)
    assert pol.residual_window(10, short) == 16  # 14 tokens, rounded to a block: never flushes
