import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.pallas_kernels import packing


@pytest.mark.parametrize("bits", packing.SUPPORTED_BITS)
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_pack_unpack_exact(bits, axis):
    per = packing.codes_per_word(bits)
    shape = [3, 5, 7]
    shape[axis] = per * 2
    codes = jax.random.randint(jax.random.key(np.random.randint(1 << 30)), shape, 0, 2**bits)
    words = packing.pack(codes, bits, axis)
    assert words.dtype == jnp.uint32
    assert words.shape[axis] == packing.packed_length(shape[axis], bits)
    np.testing.assert_array_equal(packing.unpack(words, bits, axis), codes)


@settings(max_examples=25, deadline=None)
@given(
    bits=st.sampled_from(packing.SUPPORTED_BITS),
    groups=st.integers(1, 4),
    lead=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_roundtrip_hypothesis(bits, groups, lead, seed):
    n = packing.codes_per_word(bits) * groups
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(lead, n))
    np.testing.assert_array_equal(packing.unpack(packing.pack(jnp.asarray(codes), bits, 1), bits, 1), codes)


def test_storage_is_bits_per_code():
    for bits in packing.SUPPORTED_BITS:
        n = 32 * 4
        assert packing.packed_length(n, bits) * 32 == n * bits


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match=f"bits={bits}"):
        packing.pack(jnp.zeros((4, 32), jnp.int32), bits, 1)


def test_bad_length():
    with pytest.raises(ValueError, match="multiple of 16"):
        packing.pack(jnp.zeros((4, 20), jnp.int32), 2, 1)
