"""attend(implementation="pallas"): the prefill kernel where the cache is prefix-valid and the
reference otherwise; the decode kernel for any cache (positions masked inside); the same results
either way."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention
from kvjax.pallas_kernels.testing import assert_attention_close


def _cache(rng, b, n, s, h, lens_bn, dtype=jnp.float32):
    k, v = (jnp.asarray(rng.standard_normal((b, n, s, h)), jnp.float32).astype(dtype) for _ in range(2))
    ar = np.arange(s)
    pos = np.where(ar[None, None] < np.asarray(lens_bn)[..., None], ar[None, None], -1)
    return k, v, jnp.asarray(pos, jnp.int32)


@pytest.fixture
def kernel_runs(monkeypatch):
    """Counts the kernel calls that actually run (the dispatcher picks kernel or reference
    with lax.cond at run time, so a trace-time flag would not tell)."""
    from kvjax import attention_kernels

    runs = []

    def probe(mod, name):
        fn = getattr(mod, name)

        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            jax.debug.callback(lambda: runs.append(name))
            return out

        monkeypatch.setattr(mod, name, wrapped)

    probe(attention_kernels, "block_sparse_attention")
    probe(attention_kernels, "sparse_decode_attention")
    return runs


def _both(q, k, v, qp, kp, **kw):
    return (
        attention.attend(q, k, v, qp, kp, implementation="pallas", **kw),
        attention.attend(q, k, v, qp, kp, implementation="reference", **kw),
    )


@pytest.mark.parametrize("window", [None, 24])
def test_prefill_prefix_cache_uses_kernel(rng, window, kernel_runs):
    b, t, nq, n, s, h = 2, 80, 4, 2, 96, 32  # T, S not multiples of the blocks: padded inside
    lens = np.array([80, 50])
    k, v, kp = _cache(rng, b, n, s, h, np.stack([lens, lens], 1))
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32)
    qp = jnp.asarray(np.where(np.arange(t)[None] < lens[:, None], np.arange(t)[None], -1), jnp.int32)
    got, want = _both(q, k, v, qp, kp, window=window)
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, "prefill")
    assert kernel_runs == ["block_sparse_attention"], "the kernel path was not taken"


def test_prefill_with_prefix_promise_has_no_conditional(rng, kernel_runs):
    """attend(prefix_cache=True) runs the kernel with no on-device layout check: the traced
    program holds no `cond` (whose reference branch needs its own score tiles in memory), and
    the result equals the reference."""
    b, t, nq, n, h = 2, 64, 4, 2, 32
    lens = np.array([64, 41])
    k, v, kp = _cache(rng, b, n, t, h, np.stack([lens, lens], 1))
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32)
    qp = jnp.asarray(np.where(np.arange(t)[None] < lens[:, None], np.arange(t)[None], -1), jnp.int32)

    def run(*a):
        return attention.attend(*a, implementation="pallas", prefix_cache=True)

    assert "cond[" not in str(jax.make_jaxpr(run)(q, k, v, qp, kp))  # no lax.cond (kernel loops have cond_jaxpr)
    got = run(q, k, v, qp, kp)
    want = attention.attend(q, k, v, qp, kp, implementation="reference")
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, "prefill")
    assert kernel_runs == ["block_sparse_attention"]


def test_decode_per_head_lengths(rng, kernel_runs):
    b, nq, n, s, h = 2, 4, 2, 128, 32
    k, v, kp = _cache(rng, b, n, s, h, [[128, 90], [7, 0]])
    q = jnp.asarray(rng.standard_normal((b, 1, nq, h)), jnp.bfloat16)
    got, want = _both(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), jnp.array([[127], [5]]), kp)
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.bfloat16, "decode")
    assert kernel_runs == ["sparse_decode_attention"], "the kernel path was not taken"


def test_reordered_cache_prefill_takes_the_position_masked_kernel(rng, kernel_runs):
    """Evicted / reordered slots are not a prefix: the prefill kernel is not used; the decode
    kernel masks by slot positions over tiles of queries (64 queries x 2 heads: 2 tiles of 32)
    and equals the reference."""
    b, t, nq, n, s, h = 1, 64, 2, 1, 64, 16
    k, v, _ = _cache(rng, b, n, s, h, [[s]])
    kp = jnp.asarray(rng.permutation(s)[None, None], jnp.int32)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32)
    qp = jnp.arange(s - t, s, dtype=jnp.int32)[None]
    got, want = _both(q, k, v, qp, kp)
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, "reordered prefill")
    assert kernel_runs == ["sparse_decode_attention"] * 2, "a reordered cache must not reach the prefill kernel"


@pytest.mark.parametrize("window", [None, 40])
def test_decode_over_evicted_cache_uses_kernel(rng, window, kernel_runs):
    """Decode masks by slot positions inside the kernel: shuffled positions, empty slots (-1),
    slots from the future (> q_pos) and a local window all match the reference."""
    b, nq, n, s, h = 2, 8, 2, 128, 32
    k, v, _ = _cache(rng, b, n, s, h, [[s, s], [s, s]])
    kp = np.stack([np.stack([rng.permutation(s) for _ in range(n)]) for _ in range(b)]).astype(np.int32)
    kp[rng.random(kp.shape) < 0.2] = -1
    q = jnp.asarray(rng.standard_normal((b, 1, nq, h)), jnp.float32)
    qp = jnp.array([[100], [127]], jnp.int32)
    got, want = _both(q, k, v, qp, jnp.asarray(kp), window=window)
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, "evicted decode")
    assert kernel_runs == ["sparse_decode_attention"], "the kernel path was not taken"


@pytest.mark.parametrize("window", [None, 20])
def test_key_mass_through_the_kernels(rng, window, kernel_runs):
    """want_mass with the kernels: prefill and decode run the kernel and the slot masses come
    from its log-sum-exps (`key_mass_from_lse`), equal to the reference's."""
    b, t, nq, n, h = 2, 48, 4, 2, 32
    lens = np.array([48, 30])
    k, v, kp = _cache(rng, b, n, t, h, np.stack([lens, lens], 1))
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32)
    qp = jnp.asarray(np.where(np.arange(t)[None] < lens[:, None], np.arange(t)[None], -1), jnp.int32)
    got, want = _both(q, k, v, qp, kp, window=window, want_mass=True)
    np.testing.assert_allclose(got.key_mass, want.key_mass, rtol=2e-5, atol=2e-5)
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, "prefill")
    q1 = q[:, -1:]
    qp1 = jnp.asarray(lens[:, None] - 1, jnp.int32)
    got, want = _both(q1, k, v, qp1, kp, window=window, want_mass=True)
    np.testing.assert_allclose(got.key_mass, want.key_mass, rtol=2e-5, atol=2e-5)
    assert kernel_runs == ["block_sparse_attention", "sparse_decode_attention"]


def test_key_mass_from_lse_in_small_chunks(rng):
    """The chunked mass pass (a budget that forces 4-query chunks and padding) equals the
    reference's mass."""
    from kvjax.attention_reference import attention_reference, key_mass_from_lse

    b, t, nq, n, h = 1, 30, 4, 2, 16
    k, v, kp = _cache(rng, b, n, t, h, [[t, t]])
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32)
    qp = jnp.arange(t, dtype=jnp.int32)[None]
    ref = attention_reference(q, k, v, qp, kp, want_mass=True)
    mass = key_mass_from_lse(q, k, qp, kp, ref.lse, budget_bytes=4 * b * nq * t * 4)
    np.testing.assert_allclose(mass, ref.key_mass, rtol=1e-5, atol=1e-6)


def test_key_mass_and_small_heads_use_reference(rng):
    b, t, nq, n, s, h = 1, 32, 2, 1, 32, 8  # head_dim 8: no kernel
    k, v, kp = _cache(rng, b, n, s, h, [[s]])
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32)
    qp = jnp.arange(t, dtype=jnp.int32)[None]
    got, want = _both(q, k, v, qp, kp, want_mass=True)
    np.testing.assert_array_equal(got.key_mass, want.key_mass)
    np.testing.assert_array_equal(got.out, want.out)


def test_default_implementation_by_backend():
    expected = "pallas" if jax.default_backend() in ("gpu", "tpu") else "reference"
    assert attention.default_implementation() == expected
    assert sorted(attention.IMPLEMENTATIONS) == ["pallas", "reference"]
    assert attention.resolve_implementation(None) == attention.resolve_implementation("auto") == expected


def test_implementation_vocabulary(rng):
    """ "xla" (the old name of the reference) still runs it, with a DeprecationWarning naming the
    new one; an unknown name is refused with the accepted ones; a function is called as is."""
    k, v, kp = _cache(rng, 1, 1, 16, 8, [[16]])
    q, qp = jnp.asarray(rng.standard_normal((1, 1, 2, 8)), jnp.float32), jnp.asarray([[15]], jnp.int32)
    want = attention.attend(q, k, v, qp, kp, implementation="reference")
    with pytest.warns(DeprecationWarning, match=r"implementation='xla' is deprecated; use implementation='reference'"):
        old = attention.attend(q, k, v, qp, kp, implementation="xla")
    np.testing.assert_array_equal(old.out, want.out)
    with pytest.raises(
        ValueError,
        match=r"unknown attention implementation='triton'; expected 'auto', one of \['pallas', 'reference'\]",
    ):
        attention.attend(q, k, v, qp, kp, implementation="triton")
    calls = []

    def mine(*args, **kw):
        calls.append(sorted(kw))
        return attention.attention_reference(*args, **kw)

    np.testing.assert_array_equal(attention.attend(q, k, v, qp, kp, implementation=mine).out, want.out)
    assert calls == [["scale", "want_mass", "window"]]
