"""Chunked prefill through the kernels (`attend(implementation="pallas")` with T > 1 queries at an
offset): the chunk kernels over a prefix-valid past, the tiled position-masked decode kernel over
any other layout, and the reference's key blocks off the CPU; each equal to the reference, and no
program holding a [T, S] score array."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention, attention_reference
from kvjax.pallas_kernels.testing import assert_attention_close


@pytest.fixture
def kernel_runs(monkeypatch):
    """The kernels that actually ran (the dispatcher picks one with lax.switch at run time)."""
    from kvjax import attention_kernels

    runs = []

    def probe(name):
        fn = getattr(attention_kernels, name)

        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            jax.debug.callback(lambda: runs.append(name))
            return out

        monkeypatch.setattr(attention_kernels, name, wrapped)

    probe("block_sparse_attention")
    probe("sparse_decode_attention")
    return runs


def _chunk_case(rng, b, t, nq, n, s, h, off, lens, shuffle=False, dtype=jnp.float32):
    """A cache of capacity s holding positions 0..len-1 per row (shuffled over the slots, with
    a fifth of them evicted, when `shuffle`), and T queries at off..off+T-1 (-1 past a row's length)."""
    k, v = (jnp.asarray(rng.standard_normal((b, n, s, h)), jnp.float32).astype(dtype) for _ in range(2))
    ar = np.arange(s)
    kp = np.broadcast_to(np.where(ar[None, None] < np.asarray(lens)[:, None, None], ar, -1), (b, n, s)).copy()
    if shuffle:
        for i in np.ndindex(b, n):
            kp[i] = kp[i][rng.permutation(s)]
        kp[(rng.random(kp.shape) < 0.2) & (kp < off)] = -1
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(dtype)
    qp = off + np.arange(t)[None]
    qp = np.where(qp < np.asarray(lens)[:, None], qp, -1)
    return q, k, v, jnp.asarray(qp, jnp.int32), jnp.asarray(kp, jnp.int32)


@pytest.mark.parametrize(
    "off, shuffle, window, kernels",
    [
        (64, False, None, ["block_sparse_attention"] * 2),  # past + chunk, merged
        (64, True, None, ["sparse_decode_attention"] * 2),  # evicted, shuffled past: decode kernel, 2 tiles
        (64, False, 40, ["sparse_decode_attention"] * 2),  # a window at an offset: the same
    ],
)
def test_chunk_equals_reference(rng, off, shuffle, window, kernels, kernel_runs):
    """A 48-query chunk (two tiles of the decode kernel: 32 queries x 2 heads per tile) over a
    192-slot cache; rows of different lengths (one ends inside the chunk)."""
    args = _chunk_case(rng, 2, 48, 4, 2, 192, 32, off, [150, off + 20], shuffle)
    got = jax.jit(lambda *a: attention.attend(*a, implementation="pallas", window=window))(*args)
    want = attention.attend(*args, implementation="reference", window=window)
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, f"chunk at {off}")
    assert kernel_runs == kernels


def test_few_queries_take_one_decode_tile(rng, kernel_runs):
    """8 queries x 2 heads fit one decode-kernel tile: it serves the prefix-valid cache with no
    conditional (speculative verification)."""
    args = _chunk_case(rng, 2, 8, 4, 2, 192, 32, 100, [150, 104])
    run = jax.jit(lambda *a: attention.attend(*a, implementation="pallas"))
    assert "cond[" not in str(jax.make_jaxpr(run)(*args))
    got, want = run(*args), attention.attend(*args, implementation="reference")
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, "8 queries at 100")
    assert kernel_runs == ["sparse_decode_attention"]


@pytest.mark.slow
def test_chunk_bfloat16_and_odd_offset(rng, kernel_runs):
    """An offset that is no multiple of any block, a single row, bfloat16."""
    args = _chunk_case(rng, 1, 40, 4, 1, 256, 32, 131, [256], dtype=jnp.bfloat16)
    got = jax.jit(lambda *a: attention.attend(*a, implementation="pallas"))(*args)
    want = attention.attend(*args, implementation="reference")
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.bfloat16, "chunk at 131")
    assert kernel_runs == ["block_sparse_attention"] * 2


def test_blocked_reference_off_the_cpu(rng, monkeypatch):
    """Off the CPU, a query chunk whose scores would pass `score_budget` runs over key blocks with
    an online softmax (no conditionals); the same output, log-sum-exps and slot masses. The
    backend query is patched to "gpu"; the budget forces 128-slot blocks and a padded last one."""
    args = _chunk_case(rng, 2, 40, 4, 2, 300, 16, 100, [300, 120], shuffle=True)
    want = attention_reference.attention_reference(*args, want_mass=True, window=64)
    monkeypatch.setattr(attention_reference.jax, "default_backend", lambda: "gpu")
    got = attention_reference.attention_reference(*args, want_mass=True, window=64, score_budget=2 * 4 * 40 * 128 * 4)
    assert_attention_close(got.out, got.lse, want.out, want.lse, jnp.float32, "blocked reference")
    np.testing.assert_allclose(got.key_mass, want.key_mass, rtol=2e-5, atol=2e-5)


_TENSOR = re.compile(r"tensor<([\dx]+)x(?:f32|bf16|f16)>")


def _largest_float_tensor(fn, *args) -> int:
    """Elements of the largest floating-point array in the lowered program of fn(*args)."""
    text = jax.jit(fn).lower(*args).as_text()
    return max(int(np.prod([int(d) for d in m.group(1).split("x")])) for m in _TENSOR.finditer(text))


@pytest.mark.parametrize("shuffle", [False, True])
def test_chunk_program_holds_no_chunk_by_context_scores(rng, shuffle, monkeypatch):
    """A 64-query chunk against a 4096-slot cache: every branch of the lowered program (the chunk
    kernels, the tiled decode kernel) holds no array as large as one KV head's [G, T, S] scores;
    neither does the reference off the CPU when those scores pass its budget. The reference with an
    unbounded budget does (the check can fail)."""
    b, t, nq, n, s, h = 1, 64, 2, 1, 4096, 16
    args = _chunk_case(rng, b, t, nq, n, s, h, 1024, [s], shuffle)
    scores = (nq // n) * t * s
    assert _largest_float_tensor(lambda *a: attention.attend(*a, implementation="pallas"), *args) < scores
    monkeypatch.setattr(attention_reference.jax, "default_backend", lambda: "gpu")
    bounded = lambda *a: attention_reference.attention_reference(*a, score_budget=scores)
    assert _largest_float_tensor(bounded, *args) < scores
    unbounded = lambda *a: attention_reference.attention_reference(*a, score_budget=1 << 62)
    assert _largest_float_tensor(unbounded, *args) >= scores


@pytest.mark.parametrize("spec", ["dense", "kivi:bits=2"])
def test_chunked_prefill_program_holds_no_chunk_by_context_scores(spec):
    """`kvjax.generation.prefill` of a 4096-token prompt in 64-token chunks through the kernels
    (one-layer tiny model, lowered program only): no array as large as one KV head's [G, T, S]
    scores anywhere in it."""
    from helpers import tiny_config

    from kvjax.generation import prefill
    from kvjax.models import init_params
    from kvjax.policies import parse_policy

    cfg = tiny_config(num_layers=1, max_position=8192, name="tiny-chunked-prefill-program")
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    t, s = 64, 4096

    def run(p, tokens, lengths):
        kw = dict(config=cfg, policy=parse_policy(spec), max_new_tokens=8, implementation="pallas")
        return prefill(p, tokens, lengths, prefill_chunk=t, **kw)

    tokens, lengths = jax.ShapeDtypeStruct((1, s), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    g = cfg.num_heads // cfg.num_kv_heads
    assert _largest_float_tensor(run, params, tokens, lengths) < g * t * s


@pytest.mark.parametrize("backend, kernels", [("mosaic_gpu", {"mosaic_gpu", "triton"}), ("triton", {"triton"})])
def test_chunk_dispatch_lowers_for_cuda(backend, kernels, monkeypatch):
    """Every branch of a 256-query chunk over a 1024-slot bfloat16 cache (the prefill kernel, the
    two chunk kernels, the tiled decode kernel) lowers for a CUDA target from this CPU machine
    (Mosaic GPU for the block-sparse calls on Hopper, Triton for the decode kernel)."""
    from kvjax.pallas_kernels import _compat
    from kvjax.pallas_kernels.testing import lower_for

    monkeypatch.setattr(_compat, "backend_kind", lambda: backend)
    q = jnp.zeros((1, 256, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 2, 1024, 128), jnp.bfloat16)
    args = (q, k, k, jnp.zeros((1, 256), jnp.int32), jnp.zeros((1, 2, 1024), jnp.int32))
    text = lower_for("cuda", lambda *a: attention.attend(*a, implementation="pallas"), *args)
    assert {name for name in ("mosaic_gpu", "triton") if name in text} == kernels
    assert text.count("custom_call") >= 4  # one per kernel call of the four branches
