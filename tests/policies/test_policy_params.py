"""Traced policy parameters: `policy_params` passed through forward / prefill / decode / generate
reach the policy as arrays, so jax.grad reaches them; None keeps every policy as it was."""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generation import decode, prefill
from kvjax.models.forward import forward
from kvjax.policies.dense import Dense
from kvjax.sampling import Sampler
from kvjax.state import LayerContext


@dataclasses.dataclass(frozen=True)
class _Scaled(Dense):
    """Dense attention with each layer's values scaled by params["scale"][layer] (a scalar)."""

    name = "_scaled"
    takes_params: ClassVar[bool] = True

    def prefill(self, state, q, k, v, q_pos, ctx, params=None):
        return Dense.prefill(self, state, q, k, v * self._scale(params, ctx), q_pos, ctx)

    def decode(self, state, q, k, v, q_pos, ctx, params=None):
        return Dense.decode(self, state, q, k, v * self._scale(params, ctx), q_pos, ctx)

    @staticmethod
    def _scale(params, ctx):
        return 1.0 if params is None else params["scale"][ctx.layer].astype(jnp.float32)


def _loss(pp, params, cfg, tokens):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    state = _Scaled().init_state(cfg, b, t, 0, jnp.float32)
    ctx = LayerContext(0, cfg, "prefill", True, t, 0)
    logits, _ = forward(params, tokens, pos, state, config=cfg, policy=_Scaled(), ctx=ctx, policy_params=pp)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_gradient_reaches_a_policy_parameter(tiny_config, tiny_params, rng):
    """d loss / d scale through forward equals a central finite difference, for every layer."""
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, (2, 16)), jnp.int32)
    pp = {"scale": jnp.asarray([1.0, 0.7, 1.3][: tiny_config.num_layers], jnp.float32)}
    loss = jax.jit(functools.partial(_loss, params=tiny_params, cfg=tiny_config, tokens=tokens))
    g = np.asarray(jax.jit(jax.grad(loss))(pp)["scale"])
    assert np.all(np.abs(g) > 0)
    eps = 1e-2
    for i in range(tiny_config.num_layers):
        up = {"scale": pp["scale"].at[i].add(eps)}
        dn = {"scale": pp["scale"].at[i].add(-eps)}
        fd = (float(loss(up)) - float(loss(dn))) / (2 * eps)
        np.testing.assert_allclose(g[i], fd, rtol=2e-2, atol=1e-4)


def test_prefill_and_decode_read_the_params(tiny_config, tiny_params, rng):
    """Scale 1 gives the dense tokens; another scale changes the logits; a policy without traced
    parameters refuses them."""
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, (2, 16)), jnp.int32)
    lengths = jnp.asarray([16, 11], jnp.int32)
    kw = dict(config=tiny_config, max_new_tokens=4)
    dk = dict(config=tiny_config, max_new_tokens=4, sampler=Sampler(), stop_ids=())
    ones = {"scale": jnp.ones((tiny_config.num_layers,))}
    lg_d, st_d = prefill(tiny_params, tokens, lengths, policy=Dense(), **kw)
    lg_1, st_1 = prefill(tiny_params, tokens, lengths, policy=_Scaled(), policy_params=ones, **kw)
    np.testing.assert_allclose(np.asarray(lg_1), np.asarray(lg_d), atol=1e-6)
    out_d = decode(tiny_params, st_d, lg_d, jax.random.key(0), policy=Dense(), **dk)[0]
    out_1 = decode(tiny_params, st_1, lg_1, jax.random.key(0), policy=_Scaled(), policy_params=ones, **dk)[0]
    np.testing.assert_array_equal(np.asarray(out_1), np.asarray(out_d))
    half = {"scale": 0.5 * ones["scale"]}
    lg_h, _ = prefill(tiny_params, tokens, lengths, policy=_Scaled(), policy_params=half, **kw)
    assert np.abs(np.asarray(lg_h) - np.asarray(lg_d)).max() > 1e-3
    with pytest.raises(ValueError, match="takes no traced parameters"):
        prefill(tiny_params, tokens, lengths, policy=Dense(), policy_params=ones, **kw)
