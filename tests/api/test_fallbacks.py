"""Fallback accounting: `kvjax.attention.fallbacks()` counts, at trace time and with the reason,
every attention call with implementation="pallas" that takes the jnp reference instead of a
kernel, and the "kvjax.attention" logger reports each one."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from kvjax import attention
from kvjax.generation import decode, prefill
from kvjax.models import init_params
from kvjax.policies import parse_policy
from kvjax.sampling import Sampler


@pytest.fixture(scope="module")
def one_layer():
    """The tiny model with one layer (each traced layer runs the kernels in interpret mode)."""
    cfg = tiny_config(num_layers=1, name="tiny-fallbacks-1layer")
    return cfg, jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, init_params(cfg, jax.random.key(0)))


@pytest.fixture(autouse=True)
def clean_counts():
    attention.reset_fallbacks()
    yield
    attention.reset_fallbacks()


def _generate(cfg, params, spec, implementation="pallas", prompt=24, new=3, chunk=None):
    tokens = jax.random.randint(jax.random.key(1), (2, prompt), 3, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([prompt, prompt - 5], jnp.int32)
    kw = dict(config=cfg, policy=parse_policy(spec), implementation=implementation)
    logits, state = prefill(params, tokens, lengths, max_new_tokens=new, prefill_chunk=chunk, **kw)
    out, _, _ = decode(
        params, state, logits, jax.random.key(0), max_new_tokens=new, sampler=Sampler(), stop_ids=(), **kw
    )
    return np.asarray(out)


def test_tiny_model_with_pallas_takes_no_fallback(one_layer):
    """Prefill (whole and in chunks at offsets) and decode of the tiny model through the kernels:
    no call takes the reference, and the tokens equal the reference's."""
    got = _generate(*one_layer, "dense", prompt=48, chunk=24)  # 24 queries x 3 heads: the chunk kernels
    assert attention.fallbacks() == {}
    want = _generate(*one_layer, "dense", implementation="reference", prompt=48, chunk=24)
    np.testing.assert_array_equal(got, want)


def test_fallback_is_counted_with_its_reason(caplog):
    """A head_dim (8) no kernel takes: prefill and decode run the reference, each counted once per
    trace with the reason, and logged."""
    cfg = tiny_config(head_dim=8, num_layers=1, name="tiny-fallback-h8")
    params = init_params(cfg, jax.random.key(0))
    with caplog.at_level(logging.DEBUG, logger="kvjax.attention"):
        _generate(cfg, params, "dense")
    counts = attention.fallbacks()
    decode_reason = "decode: head_dim=8 is not a power of two >= 16 (Triton decode kernel)"
    assert counts.get(decode_reason, 0) >= cfg.num_layers, counts
    prefill_reasons = [r for r in counts if r.startswith("prefill: dtype=float32 head_dim=8")]
    assert prefill_reasons and counts[prefill_reasons[0]] >= cfg.num_layers, counts
    assert any(decode_reason in r.getMessage() for r in caplog.records)
    attention.reset_fallbacks()
    assert attention.fallbacks() == {}


def test_capacity_fallback_reason(rng):
    """A decode over a cache whose capacity (100 slots) is no multiple of the kernel's blocks."""
    k, v = (jnp.asarray(rng.standard_normal((1, 2, 100, 32)), jnp.float32) for _ in range(2))
    kp = jnp.broadcast_to(jnp.arange(100, dtype=jnp.int32), (1, 2, 100))
    q = jnp.asarray(rng.standard_normal((1, 1, 4, 32)), jnp.float32)
    got = attention.attend(q, k, v, jnp.array([[99]]), kp, implementation="pallas")
    want = attention.attend(q, k, v, jnp.array([[99]]), kp, implementation="reference")
    np.testing.assert_array_equal(got.out, want.out)
    assert attention.fallbacks() == {
        "decode: cache capacity 100 is not a multiple of 16 slots (decode kernel blocks)": 1
    }


def test_quantized_decode_without_fused_kernel_is_counted(one_layer):
    """KIVI with 3-bit codes has no fused kernel: its decode dequantizes the streams, counted."""
    _generate(*one_layer, "kivi:bits=3", new=2)
    assert any(r.startswith("kivi (T=1): no fused kernel") for r in attention.fallbacks()), attention.fallbacks()
