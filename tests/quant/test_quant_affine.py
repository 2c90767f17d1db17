"""Quantization primitives of kvjax.quant: min-max error bounds, padded packing, the
Walsh-Hadamard transform and block floating point (fresh random inputs every run)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.quant import affine
from kvjax.quant.bfp import bfp_decode, bfp_encode

SEED = np.random.SeedSequence().entropy


def _rand(shape, seed, outliers=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if outliers:  # channel outliers, as keys have
        x[..., rng.integers(0, shape[-1])] *= 20
    return jnp.asarray(x)


# one compile per drawn shape (jit) instead of one per primitive and shape (eager dispatch)
@functools.partial(jax.jit, static_argnums=(1, 2))
def _roundtrip_channelwise(x, bits, group):
    codes, scale, zero = affine.quant_channelwise(x, bits, group)
    return codes, scale, zero, affine.dequant_channelwise(codes, scale, zero, bits, group)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _roundtrip_tokenwise(x, bits, group):
    codes, scale, zero = affine.quant_tokenwise(x, bits, group)
    return codes, scale, zero, affine.dequant_tokenwise(codes, scale, zero, bits, group, x.shape[-1])


def _bound(x, scale, zero):
    # half a step, plus float16 rounding of the stored zero / scale
    return scale.astype(jnp.float32) / 2 * (1 + 1e-2) + 2e-3 * jnp.abs(zero.astype(jnp.float32)) + 1e-6


@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    groups=st.integers(1, 3),
    n=st.integers(1, 3),
    h=st.sampled_from([8, 32, 64]),
    seed=st.integers(0, 2**31),
)
def test_channelwise_error_within_half_step(bits, groups, n, h, seed):
    group = 32  # a multiple of every codes-per-word (3-bit needs 32)
    x = _rand((2, n, groups * group, h), seed + SEED % 1000)
    codes, scale, zero, y = _roundtrip_channelwise(x, bits, group)
    assert codes.dtype == jnp.uint32 and scale.shape == (2, n, groups, h) and scale.dtype == jnp.float16
    err = jnp.abs(y - x).reshape(2, n, groups, group, h)
    assert bool(jnp.all(err <= _bound(x, scale, zero)[:, :, :, None]))


@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    s=st.integers(1, 40),
    h=st.sampled_from([16, 48, 64]),
    group=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**31),
)
def test_tokenwise_error_within_half_step(bits, s, h, group, seed):
    x = _rand((1, 2, s, h), seed + SEED % 1000)
    _codes, scale, zero, y = _roundtrip_tokenwise(x, bits, group)
    assert scale.shape == (1, 2, s, h // group)
    err = jnp.abs(y - x).reshape(1, 2, s, h // group, group)
    assert bool(jnp.all(err <= _bound(x, scale, zero)[..., None]))
    # more bits, smaller error (on the same data)
    if bits < 8:
        y8 = _roundtrip_tokenwise(x, 8, group)[3]
        assert float(jnp.max(jnp.abs(y8 - x))) <= float(jnp.max(jnp.abs(y - x))) + 1e-6


def test_constant_groups_are_exact():
    x = jnp.full((1, 1, 32, 8), 3.25, jnp.float32)
    y = affine.dequant_channelwise(*affine.quant_channelwise(x, 2, 32), 2, 32)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_padded_pack_round_trip(bits):
    rng = np.random.default_rng(SEED % 2**32)
    length = 48  # not a multiple of 32: 3-bit pads to 64 codes
    codes = jnp.asarray(rng.integers(0, 2**bits, (3, 5, length)), jnp.int32)
    words = affine.pack(codes, bits, axis=2)
    per = 32 if bits == 3 else 32 // bits
    assert words.shape[2] == -(-length // per) * (3 if bits == 3 else 1)
    np.testing.assert_array_equal(np.asarray(affine.unpack(words, bits, 2, length)), np.asarray(codes))


def test_bits_check_message():
    with pytest.raises(ValueError, match=r"bits=5 is not supported; expected one of \(2, 3, 4, 8\)"):
        affine.check_bits(5)
    with pytest.raises(ValueError, match="group=24 must divide head_dim=64"):
        affine.quant_tokenwise(jnp.zeros((1, 1, 2, 64)), 4, 24)


@pytest.mark.parametrize("n", [2, 8, 64])
def test_fwht_matches_hadamard_matrix_and_inverts(n):
    hmat = np.array([[1.0]])
    while hmat.shape[0] < n:
        hmat = np.block([[hmat, hmat], [hmat, -hmat]])
    x = _rand((3, n), SEED % 2**32, outliers=False)
    np.testing.assert_allclose(np.asarray(affine.fwht(x)), np.asarray(x) @ hmat.T / np.sqrt(n), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(affine.fwht(affine.fwht(x))), np.asarray(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="size 12 must be a power of two"):
        affine.fwht(jnp.zeros((12,)))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bfp_error_within_half_ulp_of_shared_exponent(bits):
    x = _rand((2, 3, 5, 64), SEED % 2**32)
    codes, exps = bfp_encode(x, bits, 16)
    assert exps.dtype == jnp.int8 and int(codes.max()) <= 2 * (2 ** (bits - 1) - 1)
    y = bfp_decode(codes, exps, bits, 16)
    step = jnp.exp2(exps.astype(jnp.float32))[..., None]
    err = jnp.abs(y - x).reshape(2, 3, 5, 4, 16)
    assert bool(jnp.all(err <= step / 2 + 1e-6))
    amax = jnp.max(jnp.abs(x.reshape(2, 3, 5, 4, 16)), axis=-1)
    mmax = 2 ** (bits - 1) - 1
    assert bool(jnp.all(amax <= mmax * step[..., 0])) and bool(jnp.all(amax > mmax * step[..., 0] / 2))
