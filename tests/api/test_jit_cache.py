"""kvjax.jit_cache: the guard against XLA:CPU running out of memory mappings."""

import sys

import jax
import jax.numpy as jnp
import pytest

from kvjax import jit_cache


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps is Linux-only")
def test_release_drops_compiled_programs_only_above_the_threshold():
    assert jit_cache.map_count() > 0
    fns = [jax.jit(lambda x, i=i: jnp.tanh(x @ x.T + i).sum()) for i in range(20)]
    for f in fns:
        f(jnp.ones((8, 8))).block_until_ready()
    assert all(f._cache_size() == 1 for f in fns)
    assert not jit_cache.release_if_high(threshold=10**9)  # below the threshold: nothing dropped
    assert all(f._cache_size() == 1 for f in fns)
    assert jit_cache.release_if_high(threshold=0)
    assert all(f._cache_size() == 0 for f in fns)
    assert float(fns[0](jnp.ones((8, 8)))) == pytest.approx(float(jnp.tanh(jnp.full((8, 8), 8.0)).sum()))
