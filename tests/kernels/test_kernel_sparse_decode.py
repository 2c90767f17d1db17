"""Sparse (selected-block) decode attention against its float32 jnp reference."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.pallas_kernels import sparse_decode_attention as sda
from kvjax.pallas_kernels.testing import INTERPRET, assert_attention_close, lower_for


def _run(
    rng, *, b=2, t=1, nq=4, n=2, s=256, h=32, bs=32, k=4, dtype=jnp.float32, counts=True, per_head_len=False, splits=2
):
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    q, kk, vv = f(b, t, nq, h), f(b, n, s, h), f(b, n, s, h)
    idx = jnp.asarray(
        np.stack([[rng.choice(s // bs, k, replace=False) for _ in range(n)] for _ in range(b)]), jnp.int32
    )
    cnt = jnp.asarray(rng.integers(0, k + 1, (b, n)), jnp.int32) if counts else None
    lens = jnp.asarray(rng.integers(0, s + 1, (b, n) if per_head_len else (b,)), jnp.int32)
    out, lse = sda.sparse_decode_attention(
        q,
        kk,
        vv,
        idx,
        lens,
        block_size=bs,
        block_counts=cnt,
        block_sizes=sda.SparseDecodeBlockSizes(num_splits=splits),
        interpret=INTERPRET,
    )
    ref_out, ref_lse = sda.sparse_decode_attention_reference(q, kk, vv, idx, lens, block_size=bs, block_counts=cnt)
    assert out.dtype == dtype
    assert_attention_close(out, lse, ref_out, ref_lse, dtype, "sparse decode")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(t=3, nq=2, n=2, counts=False, splits=1),
        dict(nq=8, n=1, bs=64, k=3),
        dict(per_head_len=True, splits=3),
    ],
    ids=["gqa2", "spec3", "gqa8", "ragged"],
)
def test_grid(rng, dtype, kw):
    _run(rng, dtype=dtype, **kw)


@settings(max_examples=4, deadline=None)
@given(
    t=st.integers(1, 2),
    g=st.sampled_from([1, 4]),
    n=st.integers(1, 2),
    k=st.integers(1, 6),
    splits=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis(t, g, n, k, splits, seed):
    _run(np.random.default_rng(seed), t=t, nq=g * n, n=n, k=k, splits=splits)


@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("t", [1, 2])
def test_position_masking(rng, t, window):
    """k_pos / q_pos / window: kvjax's visibility rule inside the kernel (shuffled, empty and
    future slots), on top of the block selection and lengths."""
    b, nq, n, s, h, bs = 2, 4, 2, 128, 32, 32
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = f(b, t, nq, h), f(b, n, s, h), f(b, n, s, h)
    kp = np.stack([np.stack([rng.permutation(s) for _ in range(n)]) for _ in range(b)]).astype(np.int32)
    kp[rng.random(kp.shape) < 0.25] = -1
    qp = jnp.asarray([[90, 91][:t], [-1, 127][-t:]], jnp.int32)  # row 1, t=1: a padding query
    idx = jnp.asarray(np.stack([[rng.choice(s // bs, 3, replace=False) for _ in range(n)] for _ in range(b)]))
    lens = jnp.asarray([[s, 100], [64, s]], jnp.int32)
    kw = dict(block_size=bs, k_pos=jnp.asarray(kp), q_pos=qp, window=window)
    out, lse = sda.sparse_decode_attention(q, k, v, idx, lens, interpret=INTERPRET, **kw)
    ref_out, ref_lse = sda.sparse_decode_attention_reference(q, k, v, idx, lens, **kw)
    assert_attention_close(out, lse, ref_out, ref_lse, jnp.float32, "position-masked decode")


def test_repeated_and_out_of_range_blocks_count_once(rng):
    """A repeated block number attends once and a negative or past-the-end one not at all, as
    in the reference (a kernel that only clamped the numbers would count a repeat twice)."""
    b, nq, n, s, h, bs = 1, 2, 2, 128, 32, 32
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = f(b, 1, nq, h), f(b, n, s, h), f(b, n, s, h)
    idx = jnp.asarray([[[2, 2, 0, 9, -1], [3, 1, 3, 4, 1]]], jnp.int32)
    lens = jnp.asarray([[s, 100]], jnp.int32)
    out, lse = sda.sparse_decode_attention(q, k, v, idx, lens, block_size=bs, interpret=INTERPRET)
    ref_out, ref_lse = sda.sparse_decode_attention_reference(q, k, v, idx, lens, block_size=bs)
    assert_attention_close(out, lse, ref_out, ref_lse, jnp.float32, "messy selection")


def test_position_arguments_errors(rng):
    q, k = jnp.zeros((1, 1, 2, 32)), jnp.zeros((1, 1, 64, 32))
    idx, lens = jnp.zeros((1, 1, 2), jnp.int32), jnp.array([64])
    with pytest.raises(ValueError, match="pass both k_pos"):
        sda.sparse_decode_attention(q, k, k, idx, lens, block_size=32, k_pos=jnp.zeros((1, 1, 64), jnp.int32))
    with pytest.raises(ValueError, match=r"k_pos\(1, 64\) must be \[B, N, S\]"):
        sda.sparse_decode_attention(
            q, k, k, idx, lens, block_size=32, k_pos=jnp.zeros((1, 64), jnp.int32), q_pos=jnp.zeros((1, 1), jnp.int32)
        )
    with pytest.raises(ValueError, match="window=0 needs k_pos"):
        sda.sparse_decode_attention(q, k, k, idx, lens, block_size=32, window=0)


def test_all_blocks_is_dense_decode(rng):
    """Selecting every block reproduces plain attention over the valid prefix."""
    from kvjax.attention import attention_reference

    b, n, s, h, bs = 2, 2, 128, 32, 32
    q = jnp.asarray(rng.standard_normal((b, 1, 4, h)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, n, s, h)), jnp.float32) for _ in range(2))
    lens = jnp.array([100, 128])
    idx = jnp.broadcast_to(jnp.arange(s // bs), (b, n, s // bs))
    out, lse = sda.sparse_decode_attention(q, k, v, idx, lens, block_size=bs, interpret=INTERPRET)
    pos = jnp.where(jnp.arange(s)[None, None] < lens[:, None, None], jnp.arange(s), -1)
    want = attention_reference(q, k, v, jnp.full((b, 1), s), jnp.broadcast_to(pos, (b, n, s)))
    assert_attention_close(out, lse, want.out, want.lse, jnp.float32, "dense via sparse")


@pytest.mark.parametrize("positions", [False, True])
def test_triton_lowering(positions):
    b, nq, n, s, h = 8, 32, 8, 131072, 128
    z = jnp.zeros
    fn = functools.partial(
        sda._sparse_decode_jit,
        block_size=64,
        scale=0.1,
        bsz=sda.SparseDecodeBlockSizes(),
        interpret=False,
        window=4096 if positions else None,
    )
    pos = (z((b, n, s), jnp.int32), z((b, 1), jnp.int32)) if positions else (None, None)
    text = lower_for(
        "cuda",
        fn,
        z((b, 1, nq, h), jnp.bfloat16),
        z((b, n, s, h), jnp.bfloat16),
        z((b, n, s, h), jnp.bfloat16),
        z((b, n, 256), jnp.int32),
        z((b, n), jnp.int32),
        z((b, n), jnp.int32),
        *pos,
    )
    assert "triton" in text


def test_bad_inputs_name_the_values():
    q, k = jnp.zeros((1, 1, 4, 32)), jnp.zeros((1, 2, 128, 32))
    idx, lens = jnp.zeros((1, 2, 3), jnp.int32), jnp.array([128])
    call = functools.partial(sda.sparse_decode_attention, interpret=True)
    with pytest.raises(ValueError, match=r"S=128 must be a multiple of block_size=48"):
        call(q, k, k, idx, lens, block_size=48)
    with pytest.raises(ValueError, match=r"block_size=8 must be a power of two >= 16"):
        call(q, k, k, idx, lens, block_size=8)
    with pytest.raises(ValueError, match=r"query heads nq=3 must be a multiple of key/value heads n=2"):
        call(jnp.zeros((1, 1, 3, 32)), k, k, idx, lens, block_size=32)
    with pytest.raises(ValueError, match=r"block_indices shape \(1, 3, 3\) must be \[B, N, K\] with B=1, N=2"):
        call(q, k, k, jnp.zeros((1, 3, 3), jnp.int32), lens, block_size=32)
    with pytest.raises(ValueError, match=r"block_indices dtype=float32 must be an integer type"):
        call(q, k, k, idx.astype(jnp.float32), lens, block_size=32)
    with pytest.raises(ValueError, match=r"k dtype=int8 is not supported"):
        call(q, k.astype(jnp.int8), k.astype(jnp.int8), idx, lens, block_size=32)
    with pytest.raises(ValueError, match=r"lengths must be \[B\]=\(1,\) or \[B, N\]=\(1, 2\)"):
        call(q, k, k, idx, jnp.array([1, 2]), block_size=32)
