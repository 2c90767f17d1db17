"""The serving calculator: exact KV bytes from shapes, and the peak-performance model."""

import jax.numpy as jnp
import pytest
from typer.testing import CliRunner

from kvjax.analysis import kv_cache_bytes, serving_estimate
from kvjax.cli import app
from kvjax.generation import prefill
from kvjax.models.presets import LLAMA3_1_8B
from kvjax.policies import parse_policy


@pytest.mark.parametrize(
    "spec", ["dense", "snapkv:budget=0.25,window=4", "kivi:bits=2,group=16,residual=16", "adakv:budget=0.25,window=4"]
)
def test_kv_bytes_equal_a_real_prefill(spec, tiny_config, tiny_params, rng):
    pol = parse_policy(spec)
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(2, 64)), jnp.int32)
    _, state = prefill(tiny_params, tokens, jnp.asarray([64, 64]), config=tiny_config, policy=pol, max_new_tokens=0)
    assert kv_cache_bytes(tiny_config, pol, 64, batch=2, dtype=jnp.float32) == state.nbytes


def test_dense_8b_numbers():
    r = serving_estimate(LLAMA3_1_8B, parse_policy("dense"), 131072, "h100", mfu=1.0, mbu=1.0)
    assert r["kv_bytes_per_token"] == pytest.approx(131072 + 32 * 8 * 4, rel=1e-3)  # bf16 K+V + int32 positions
    assert r["max_users"] == int((80e9 - 2 * LLAMA3_1_8B.num_params()) // r["kv_bytes_per_user"])
    assert r["decode_step_s"] == pytest.approx((r["weight_bytes"] + r["users"] * r["kv_bytes_per_user"]) / 3.35e12)
    two_bit = serving_estimate(LLAMA3_1_8B, parse_policy("snapkv:budget=0.2+kivi:bits=2"), 131072, "h100")
    assert two_bit["max_users"] > 10 * r["max_users"]


def test_errors():
    with pytest.raises(ValueError, match="unknown device 'v100'"):
        serving_estimate(LLAMA3_1_8B, parse_policy("dense"), 1024, "v100")
    with pytest.raises(ValueError, match="mfu=0 and mbu=0.8 must be in"):
        serving_estimate(LLAMA3_1_8B, parse_policy("dense"), 1024, "h100", mfu=0)


def test_cli_cost():
    r = CliRunner().invoke(
        app, ["cost", "--model", "llama3.1-8b", "--context", "32768", "--policy", "dense", "--policy", "kivi:bits=2"]
    )
    assert r.exit_code == 0, r.output
    assert "kivi:bits=2" in r.output and "max users" in r.output
