"""The jnp reference attention: its block-skipping online softmax (long prompts, CPU path)
equals one exact softmax over all slots, for any slot layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention_reference as attention


def _case(rng, b, t, nq, n, s, h, dtype, layout):
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    q, k, v = f(b, t, nq, h), f(b, n, s, h), f(b, n, s, h)
    filled = s - 37
    kp = np.broadcast_to(np.where(np.arange(s) < filled, np.arange(s), -1), (b, n, s)).copy()
    if layout == "shuffled":  # evicted / merged caches: positions in any order, holes anywhere
        kp = np.stack([np.stack([rng.permutation(kp[0, 0]) for _ in range(n)]) for _ in range(b)])
    qp = np.broadcast_to(np.arange(filled - t, filled), (b, t)).copy()
    qp[0, :3] = -1  # padding queries
    if b > 1:
        qp[1] = np.arange(t) - t  # a row whose queries all sit before every slot: sees nothing
        qp[1, -1] = 5
    return q, k, v, jnp.asarray(qp, jnp.int32), jnp.asarray(kp, jnp.int32)


@pytest.mark.parametrize("window", [None, 150])
@pytest.mark.parametrize("layout", ["prefix", "shuffled"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_block_skipping_equals_one_softmax(rng, window, layout, dtype):
    q, k, v, qp, kp = _case(rng, 2, 300, 4, 2, 700, 32, dtype, layout)
    got = attention.attention_reference(q, k, v, qp, kp, window=window)
    want_out, want_lse, _ = attention._attention_block(q, k, v, qp, kp, window, None, False)
    tol = 1e-5 if dtype == jnp.float32 and jax.default_backend() == "cpu" else 1e-2  # GPU float32 dots use TF32
    np.testing.assert_allclose(np.asarray(got.out, np.float32), np.asarray(want_out, np.float32), atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.isfinite(got.lse), np.isfinite(want_lse))
    fin = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(got.lse)[fin], np.asarray(want_lse)[fin], atol=tol)
    assert not np.isnan(np.asarray(got.out, np.float32)).any()


def test_key_mass_keeps_the_exact_path(rng):
    q, k, v, qp, kp = _case(rng, 1, 200, 2, 1, 400, 16, jnp.float32, "prefix")
    got = attention.attention_reference(q, k, v, qp, kp, want_mass=True)
    _, _, mass = attention._attention_block(q, k, v, qp, kp, None, None, True)
    np.testing.assert_allclose(got.key_mass, mass, rtol=1e-5, atol=1e-6)
