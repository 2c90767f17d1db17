"""KIVI quantized decode attention against its float32 jnp reference (interpret mode on CPU).
Caches are built with `pallas_kernels.packing.pack` in the layout the quantization policy uses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.pallas_kernels import packing
from kvjax.pallas_kernels import quantized_decode_attention as qda
from kvjax.pallas_kernels.testing import INTERPRET, assert_attention_close, lower_for


def _cache(rng, b, n, s, h, bits, gk, gv, dtype):
    kc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=2)
    vc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=3)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    u = lambda *shape: jnp.asarray(rng.random(shape) * 2.0 / 2**bits, jnp.float32).astype(dtype)
    return kc, u(b, n, s // gk, h), f(b, n, s // gk, h), vc, u(b, n, s, h // gv), f(b, n, s, h // gv)


def _run(
    rng,
    *,
    bits,
    b=2,
    t=1,
    nq=4,
    n=2,
    s=256,
    h=32,
    gk=32,
    gv=16,
    r=16,
    dtype=jnp.float32,
    per_head=True,
    residual=True,
    blk=None,
):
    blk = blk or qda.DecodeBlockSizes(block_s=64, num_splits=2)
    cache = _cache(rng, b, n, s, h, bits, gk, gv, dtype)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(dtype)
    lens = rng.integers(0, s + 1, (b, n) if per_head else (b,))
    lens[0, ...] = 0 if b > 1 else lens[0, ...]  # one row with an empty quantized part
    res = {}
    if residual:
        kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(dtype) for _ in range(2))
        res = dict(k_res=kr, v_res=vr, res_lengths=jnp.asarray(rng.integers(0, r + 1, (b,)), jnp.int32))
    out, lse = qda.quantized_decode_attention(
        q, *cache, jnp.asarray(lens, jnp.int32), bits=bits, block_sizes=blk, interpret=INTERPRET, **res
    )
    ref_out, ref_lse = qda.quantized_decode_attention_reference(
        q, *cache, jnp.asarray(lens, jnp.int32), bits=bits, **res
    )
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3]
    assert_attention_close(out, lse, ref_out, ref_lse, dtype, f"kivi{bits}")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_bits_and_dtypes(rng, bits, dtype):
    _run(rng, bits=bits, dtype=dtype)


@pytest.mark.parametrize(
    "kw",
    [
        dict(bits=2, t=3, nq=2, n=2, per_head=False),  # speculative T=3, no GQA, lengths [B]
        dict(bits=4, t=2, nq=8, n=1, gk=128, s=256),  # GQA 8, Gk > block
        dict(bits=2, residual=False, gk=64, gv=32),  # no residual window
        dict(bits=8, h=64, blk=qda.DecodeBlockSizes(block_s=32, num_splits=1)),
        dict(bits=4, blk=qda.DecodeBlockSizes(block_s=128, num_splits=None, num_warps=4)),
        dict(bits=8, t=2, blk=qda.DecodeBlockSizes(block_s=64, num_splits=2)),
        dict(bits=2, b=1, blk=qda.DecodeBlockSizes(block_s=16, num_splits=4, dequant_f32=True)),
    ],
    ids=["spec3", "gqa8", "nores", "bs32_8", "bs128_auto_splits4", "spec2_8", "bs16_f32"],
)
def test_variants(rng, kw):
    _run(rng, **kw)


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    t=st.integers(1, 3),
    g=st.sampled_from([1, 4]),
    n=st.integers(1, 2),
    nblk=st.integers(1, 4),
    gk=st.sampled_from([32, 64]),
    residual=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis(bits, t, g, n, nblk, gk, residual, seed):
    _run(
        np.random.default_rng(seed),
        bits=bits,
        t=t,
        nq=g * n,
        n=n,
        s=64 * nblk,
        gk=gk,
        residual=residual,
        blk=qda.DecodeBlockSizes(block_s=64, num_splits=nblk if nblk != 3 else 1),
    )


def test_reference_matches_plain_attention_on_dequantized_cache(rng):
    """The reference itself: dequantized tensors through kvjax's generic attention."""
    from kvjax.attention import attention_reference

    b, n, s, h, bits = 1, 2, 64, 32, 4
    cache = _cache(rng, b, n, s, h, bits, 32, 16, jnp.float32)
    q = jnp.asarray(rng.standard_normal((b, 1, 4, h)), jnp.float32)
    k = qda.dequantize_keys(*cache[:3], bits)
    v = qda.dequantize_values(*cache[3:], bits)
    lens = jnp.array([[40, 64]])
    pos = jnp.where(jnp.arange(s)[None, None] < lens[..., None], jnp.arange(s), -1)
    want = attention_reference(q, k, v, jnp.full((b, 1), s), pos)
    out, lse = qda.quantized_decode_attention_reference(q, *cache, lens, bits=bits)
    tol = 1e-5 if jax.default_backend() == "cpu" else 5e-3  # GPU float32 dots default to TF32
    np.testing.assert_allclose(out, want.out, rtol=tol, atol=tol)
    np.testing.assert_allclose(lse, want.lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_triton_lowering(bits):
    """The kernel lowers to Triton for a CUDA target at the benchmark shape, from this CPU machine."""
    b, nq, n, s, h, g, r = 8, 32, 8, 131072, 128, 32, 128
    pw = 32 // bits
    z = jnp.zeros
    args = (
        z((b, 1, nq, h), jnp.bfloat16),
        z((b, n, s // pw, h), jnp.uint32),
        z((b, n, s // g, h), jnp.bfloat16),
        z((b, n, s // g, h), jnp.bfloat16),
        z((b, n, s, h // pw), jnp.uint32),
        z((b, n, s, h // g), jnp.bfloat16),
        z((b, n, s, h // g), jnp.bfloat16),
        z((b, n), jnp.int32),
        z((b, n, r, h), jnp.bfloat16),
        z((b, n, r, h), jnp.bfloat16),
        z((b, n), jnp.int32),
    )
    fn = functools.partial(qda._quantized_decode_jit, bits=bits, scale=0.1, bsz=qda.DecodeBlockSizes(), interpret=False)
    assert "triton" in lower_for("cuda", fn, *args)


def test_bad_inputs_name_the_values(rng):
    b, n, s, h, bits = 1, 2, 128, 32, 2
    kc, ks, kz, vc, vs, vz = _cache(rng, b, n, s, h, bits, 32, 16, jnp.float32)
    q = jnp.zeros((b, 1, 4, h))
    lens = jnp.array([s])
    call = functools.partial(
        qda.quantized_decode_attention, interpret=True, block_sizes=qda.DecodeBlockSizes(block_s=64)
    )
    with pytest.raises(ValueError, match=r"bits=3 is not supported by the quantized decode kernel"):
        call(q, kc, ks, kz, vc, vs, vz, lens, bits=3)
    with pytest.raises(ValueError, match=r"bits=5 is not supported"):
        call(q, kc, ks, kz, vc, vs, vz, lens, bits=5)
    with pytest.raises(ValueError, match=r"query heads nq=3 must be a multiple of key/value heads n=2"):
        call(jnp.zeros((b, 1, 3, h)), kc, ks, kz, vc, vs, vz, lens, bits=bits)
    with pytest.raises(ValueError, match=r"k_codes must be a 4-D uint32 array; got int32"):
        call(q, kc.astype(jnp.int32), ks, kz, vc, vs, vz, lens, bits=bits)
    with pytest.raises(
        ValueError,
        match=r"v_codes\(1, 2, 128, 2\) must be \[B, N, S, H/16\] = \(1, 2, 128, 2\) for bits=4"
        r"|v_codes\(1, 2, 128, 2\) must be \[B, N, S, H/8\] = \(1, 2, 128, 4\) for bits=4",
    ):
        call(q, packing.pack(jnp.zeros((b, n, s, h), jnp.int32), 4, 2), ks, kz, vc, vs, vz, lens, bits=4)
    with pytest.raises(ValueError, match=r"k_scale dtype=int32 is not supported"):
        call(q, kc, ks.astype(jnp.int32), kz, vc, vs, vz, lens, bits=bits)
    with pytest.raises(ValueError, match=r"S=128 must be a multiple of block_s=96"):
        call(q, kc, ks, kz, vc, vs, vz, lens, bits=bits, block_sizes=qda.DecodeBlockSizes(block_s=96))
    with pytest.raises(ValueError, match=r"lengths must be \[B\]=\(1,\) or \[B, N\]=\(1, 2\); got shape \(3,\)"):
        call(q, kc, ks, kz, vc, vs, vz, jnp.array([1, 2, 3]), bits=bits)
    kr = jnp.zeros((b, n, 24, h))
    with pytest.raises(ValueError, match=r"residual window R=24 must be a power of two >= 16"):
        call(q, kc, ks, kz, vc, vs, vz, lens, bits=bits, k_res=kr, v_res=kr, res_lengths=lens)
    kr = jnp.zeros((b, n, 16, h))
    with pytest.raises(ValueError, match=r"res_lengths is required"):
        call(q, kc, ks, kz, vc, vs, vz, lens, bits=bits, k_res=kr, v_res=kr)
    with pytest.raises(ValueError, match=r"pass both k_res and v_res"):
        call(q, kc, ks, kz, vc, vs, vz, lens, bits=bits, k_res=kr)
    with pytest.raises(ValueError, match=r"backend='cuda' is not supported by this kernel; expected one of \('triton'"):
        call(q, kc, ks, kz, vc, vs, vz, lens, bits=bits, backend="cuda")


def test_backend_vocabulary(rng):
    """backend="reference" is the jnp reference (bit for bit); "xla", its old name, still is, with a
    DeprecationWarning naming the new one."""
    b, n, s, h, bits = 1, 2, 64, 32, 2
    cache = _cache(rng, b, n, s, h, bits, 32, 16, jnp.float32)
    q, lens = jnp.asarray(rng.standard_normal((b, 1, 4, h)), jnp.float32), jnp.array([[40, 64]])
    want = qda.quantized_decode_attention_reference(q, *cache, lens, bits=bits)
    got = qda.quantized_decode_attention(q, *cache, lens, bits=bits, backend="reference")
    with pytest.warns(DeprecationWarning, match=r"backend='xla' is deprecated; use backend='reference'"):
        old = qda.quantized_decode_attention(q, *cache, lens, bits=bits, backend="xla")
    for x in (got, old):
        np.testing.assert_array_equal(x[0], want[0])
        np.testing.assert_array_equal(x[1], want[1])
