"""Block-sparse flash attention against its float32 jnp reference (interpret mode on CPU)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.attention import merge_partials
from kvjax.pallas_kernels import _compat
from kvjax.pallas_kernels import block_sparse_attention as bsa
from kvjax.pallas_kernels.block_mask import MaskSpec, build_block_metadata
from kvjax.pallas_kernels.testing import INTERPRET, assert_attention_close, lower_for

SMALL = bsa.BlockSizes(block_q=32, block_kv=32)


def _inputs(rng, b, t, s, nq, n, h, dtype):
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    return f(b, t, nq, h), f(b, s, n, h), f(b, s, n, h)


def _run(rng, b, t, s, nq, n, h, dtype, spec, bm=None, lengths=None, backend="triton", bs=SMALL):
    q, k, v = _inputs(rng, b, t, s, nq, n, h, dtype)
    lens = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    out, lse = bsa.block_sparse_attention(
        q, k, v, mask=spec, block_mask=bm, kv_lengths=lens, block_sizes=bs, backend=backend, interpret=INTERPRET
    )
    ref_out, ref_lse = bsa.block_sparse_attention_reference(q, k, v, mask=spec, block_mask=bm, kv_lengths=lens)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_attention_close(out, lse, ref_out, ref_lse, dtype, f"{spec} {backend}")
    return out, lse


CASES = [  # B, T, S, Nq, N, H, dtype, spec, block-mask heads (None / 1 / Nq), lengths
    (2, 64, 64, 2, 2, 32, jnp.float32, MaskSpec(causal=True), None, None),
    (1, 64, 128, 4, 1, 32, jnp.bfloat16, MaskSpec(causal=True, q_offset=64), None, [100]),
    (2, 64, 128, 4, 2, 16, jnp.float32, MaskSpec(causal=True, window=40), None, [128, 0]),
    (1, 64, 128, 2, 1, 32, jnp.bfloat16, MaskSpec(mask_block=(32, 64)), 2, [90]),
    (2, 32, 64, 2, 2, 32, jnp.bfloat16, MaskSpec(), None, None),
    (1, 64, 96, 2, 1, 32, jnp.float16, MaskSpec(causal=True, q_offset=32, mask_block=(32, 32)), 1, [70]),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{jnp.dtype(c[6]).name}-{c[7]}-bm{c[8]}-len{c[9]}")
def test_grid(rng, case):
    b, t, s, nq, n, h, dtype, spec, heads, lengths = case
    bm = None
    if heads:
        shape = (t // spec.mask_block[0], s // spec.mask_block[1])
        bm = rng.random(shape if heads == 1 else (heads, *shape)) < 0.6
    _run(rng, b, t, s, nq, n, h, dtype, spec, bm, lengths)


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(
    b=st.integers(1, 2),
    nqb=st.integers(1, 2),
    nkb=st.integers(1, 3),
    g=st.sampled_from([1, 2]),
    n=st.integers(1, 2),
    h=st.sampled_from([16, 32]),
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 80)),
    q_off=st.sampled_from([0, 32]),
    ragged=st.booleans(),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis(b, nqb, nkb, g, n, h, causal, window, q_off, ragged, dtype, seed):
    rng = np.random.default_rng(seed)
    t, s = 32 * nqb, 32 * nkb
    lengths = rng.integers(0, s + 1, b).tolist() if ragged else None
    _run(rng, b, t, s, n * g, n, h, dtype, MaskSpec(causal=causal, window=window, q_offset=q_off), None, lengths)


def test_empty_rows_are_zero_with_minus_inf_lse(rng):
    out, lse = _run(rng, 1, 32, 64, 2, 1, 16, jnp.float32, MaskSpec(causal=True), None, [0])
    assert np.all(np.asarray(out) == 0) and np.all(np.isneginf(np.asarray(lse)))


def test_partials_merge_through_lse(rng):
    """Attention over two disjoint key halves (block masks) merges to full attention."""
    q, k, v = _inputs(rng, 2, 64, 128, 4, 2, 32, jnp.float32)
    spec = MaskSpec(causal=True, q_offset=64, mask_block=(64, 64))
    halves = [np.array([[True, False]]), np.array([[False, True]])]
    parts = [
        bsa.block_sparse_attention(
            q, k, v, mask=spec, block_mask=m, block_sizes=SMALL, backend="triton", interpret=INTERPRET
        )
        for m in halves
    ]
    out, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
    ref_out, ref_lse = bsa.block_sparse_attention_reference(q, k, v, mask=dataclasses.replace(spec, mask_block=None))
    assert_attention_close(out, lse, ref_out, ref_lse, jnp.float32, "merged halves")


def test_interpret_mode_poisons_outputs():
    """The NaN poison the checks rely on: an output block the kernel skips stays NaN."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 0)
        def _():
            o_ref[...] = x_ref[...]

    out = pl.pallas_call(
        kernel,
        grid=(2,),
        in_specs=[pl.BlockSpec((8,), lambda i: (i,))],
        out_specs=pl.BlockSpec((8,), lambda i: (i,)),
        out_shape=jax.ShapeDtypeStruct((16,), jnp.float32),
        interpret=True,
    )(jnp.ones(16))
    assert np.all(np.asarray(out[:8]) == 1) and np.all(np.isnan(np.asarray(out[8:])))


@pytest.mark.skipif(not _compat.has_tpu_interpreter(), reason="this jax has no TPU interpret mode")
@pytest.mark.parametrize(
    "spec,heads,lengths",
    [(MaskSpec(causal=True, window=50), None, [100, 30]), (MaskSpec(q_offset=32, mask_block=(32, 64)), 2, None)],
)
def test_mosaic_tpu_interpret(rng, spec, heads, lengths):
    bm = None if heads is None else rng.random((heads, 2, 2)) < 0.6
    _run(rng, 2, 64, 128, 2, 1, 32, jnp.float32, spec, bm, lengths, backend="mosaic_tpu")


@pytest.mark.parametrize("backend", ["triton", "mosaic_gpu"])
@pytest.mark.parametrize("spec", [MaskSpec(causal=True), MaskSpec(causal=True, window=300, q_offset=128)])
def test_gpu_lowering(backend, spec):
    """The GPU kernels lower (Triton IR / Mosaic GPU) for a CUDA target from this CPU machine."""
    b, t, s, nq, n, h = 1, 256, 512, 4, 2, 128
    bs = bsa.BlockSizes.get_default(backend)
    meta = build_block_metadata(spec, t, s, bs.meta_block_q(backend), bs.block_kv)
    m = tuple(jnp.asarray(a) for a in meta[:3])
    fn = lambda q, k, v, m, ln: bsa._block_sparse_jit(
        q, k, v, m, ln, spec=spec, scale=0.1, bs=bs, backend=backend, has_lengths=True, interpret=False
    )
    q = jnp.zeros((b, t, nq, h), jnp.bfloat16)
    kv = jnp.zeros((b, s, n, h), jnp.bfloat16)
    text = lower_for("cuda", fn, q, kv, kv, m, jnp.array([s]))
    assert ("triton" in text) if backend == "triton" else ("mosaic_gpu" in text)


def test_bad_inputs_name_the_values():
    q = jnp.zeros((1, 64, 4, 32))
    k = jnp.zeros((1, 64, 2, 32))
    run = lambda q, k, v, **kw: bsa.block_sparse_attention(q, k, v, block_sizes=SMALL, interpret=True, **kw)
    with pytest.raises(ValueError, match=r"q_len=48 must be a multiple of the query block 32"):
        run(q[:, :48], k, k)
    with pytest.raises(ValueError, match=r"kv_len=40 must be a multiple of block_kv=32"):
        run(q, k[:, :40], k[:, :40])
    with pytest.raises(ValueError, match=r"query heads nq=4 must be a multiple of key/value heads n=3"):
        run(q, jnp.zeros((1, 64, 3, 32)), jnp.zeros((1, 64, 3, 32)))
    with pytest.raises(ValueError, match=r"dtype=int32 is not supported"):
        run(q.astype(jnp.int32), k.astype(jnp.int32), k.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"q, k, v dtypes must match; got float32, bfloat16"):
        run(q, k.astype(jnp.bfloat16), k.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"dtype=float32 is not supported on mosaic_gpu"):
        bsa.block_sparse_attention(
            jnp.zeros((1, 128, 4, 64)), jnp.zeros((1, 128, 2, 64)), jnp.zeros((1, 128, 2, 64)), backend="mosaic_gpu"
        )
    with pytest.raises(ValueError, match=r"head_dim=24 must be a power of two >= 16 for the triton backend"):
        run(jnp.zeros((1, 64, 4, 24)), jnp.zeros((1, 64, 2, 24)), jnp.zeros((1, 64, 2, 24)))
    with pytest.raises(ValueError, match=r"kv_lengths must be an integer array of shape \[B\]=\(1,\)"):
        run(q, k, k, kv_lengths=jnp.array([1, 2]))
    with pytest.raises(ValueError, match=r"backend='cuda' is not supported"):
        bsa.block_sparse_attention(q, k, k, backend="cuda")
    with pytest.raises(ValueError, match=r"k\(1, 64, 2, 32\) and v\(1, 32, 2, 32\) must have the same shape"):
        run(q, k, k[:, :32])
