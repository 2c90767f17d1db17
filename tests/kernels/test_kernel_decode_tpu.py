"""Mosaic TPU decode kernels (sparse selected-block and KIVI quantized) in the TPU interpreter,
against their float32 jnp references, through the public entry points with backend="mosaic_tpu"
(each entry point's dispatch table sends it to the `*_tpu.py` kernel).

Each case is one compile of the interpreted kernel (seconds on CPU), so the factors are spread
over few cases instead of crossed (pairwise for the sparse kernel; every bit width with both
dtypes for the quantized one): every GQA ratio, token count, dtype, bit width and residual
setting appears, each case with ragged per-(row, head) lengths."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.pallas_kernels import _compat, packing
from kvjax.pallas_kernels import quantized_decode_attention as qda
from kvjax.pallas_kernels import sparse_decode_attention as sda
from kvjax.pallas_kernels._decode_common import clean_selection
from kvjax.pallas_kernels.testing import assert_attention_close, lower_for

pytestmark = pytest.mark.skipif(
    not _compat.has_tpu_interpreter(), reason=f"jax {jax.__version__} has no TPU interpret mode (pltpu.InterpretParams)"
)

TPU = dict(backend="mosaic_tpu", interpret=True)
# The references jitted: one compile per case instead of one per op (seconds per case on CPU).
sparse_reference = jax.jit(sda.sparse_decode_attention_reference, static_argnames=("block_size", "scale", "window"))
quantized_reference = jax.jit(qda.quantized_decode_attention_reference, static_argnames=("bits", "scale"))


def _normal(rng, dtype, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _ragged(rng, b, n, hi, block):
    """Lengths [B, N] in [0, hi]: one empty head, one mid-block, the rest random."""
    lens = rng.integers(0, hi + 1, (b, n))
    lens.flat[0] = 0
    lens.flat[-1] = block + block // 2 + 1
    return jnp.asarray(lens, jnp.int32)


# ----------------------------------------------------------------------------- sparse decode


def _sparse_inputs(rng, *, b=2, t=1, g=1, n=2, s=256, h=32, bs=32, k=5, dtype=jnp.float32):
    q, kk, vv = _normal(rng, dtype, b, t, g * n, h), _normal(rng, dtype, b, n, s, h), _normal(rng, dtype, b, n, s, h)
    idx = np.stack([[rng.choice(s // bs, k, replace=False) for _ in range(n)] for _ in range(b)])  # unsorted
    counts = rng.integers(0, k + 1, (b, n))
    counts.flat[0], counts.flat[-1] = k, k - 2  # one full, one partial list
    return q, kk, vv, jnp.asarray(idx, jnp.int32), jnp.asarray(counts, jnp.int32), _ragged(rng, b, n, s, bs)


def _check_sparse(q, k, v, idx, lens, *, what, **kw):
    out, lse = sda.sparse_decode_attention(q, k, v, idx, lens, **kw, **TPU)
    ref_out, ref_lse = sparse_reference(q, k, v, idx, lens, **kw)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3]
    assert_attention_close(out, lse, ref_out, ref_lse, q.dtype, what)


# (GQA ratio, T, dtype): every pair of values of any two factors appears once.
SCASES = [(1, 1, jnp.float32), (4, 2, jnp.float32), (1, 2, jnp.bfloat16), (4, 1, jnp.bfloat16)]


@pytest.mark.parametrize("g,t,dtype", SCASES, ids=[f"g{g}-t{t}-{jnp.dtype(d).name}" for g, t, d in SCASES])
def test_sparse(rng, g, t, dtype):
    q, k, v, idx, counts, lens = _sparse_inputs(rng, t=t, g=g, h=64 if g == 4 else 32, dtype=dtype)
    _check_sparse(q, k, v, idx, lens, block_size=32, block_counts=counts, what=f"sparse g={g} t={t}")


def test_sparse_messy_selection(rng):
    """Duplicates, negative and out-of-range block numbers, lengths [B]: the reference's meaning
    (a block counts once; numbers outside the cache select nothing). Same shapes as a grid case."""
    q, k, v, _, _, _ = _sparse_inputs(rng)
    idx = jnp.asarray([[[3, 3, -1, 0, 8], [7, 2, 7, 7, 100]], [[1, 0, 1, 0, 1], [6, 5, 4, 3, 2]]], jnp.int32)
    _check_sparse(q, k, v, idx, jnp.asarray([200, 77], jnp.int32), block_size=32, what="messy selection")


def test_sparse_positions(rng, window=50):
    """k_pos / q_pos / window (kvjax's visibility rule: shuffled, empty and future slots, a
    padding query) on top of the selection and lengths; then `attention_kernels`' decode path
    (every block selected, positions masked in-kernel) with backend="mosaic_tpu", same compile."""
    from kvjax import attention, attention_kernels

    b, t, g, n, s, bs = 2, 2, 2, 2, 128, 32
    q, k, v, idx, counts, lens = _sparse_inputs(rng, t=t, g=g, s=s, bs=bs, k=s // bs)
    kp = np.stack([np.stack([rng.permutation(s) for _ in range(n)]) for _ in range(b)]).astype(np.int32)
    kp[rng.random(kp.shape) < 0.25] = -1
    kp, qp = jnp.asarray(kp), jnp.asarray([[90, 91], [-1, 127]], jnp.int32)
    _check_sparse(
        q,
        k,
        v,
        idx,
        lens,
        block_size=bs,
        block_counts=counts,
        k_pos=kp,
        q_pos=qp,
        window=window,
        what=f"positions window={window}",
    )
    out, lse = attention_kernels._decode(q, k, v, qp, kp, window, None, True, bs, backend="mosaic_tpu")
    want = jax.jit(attention.attention_reference, static_argnames=("window",))(q, k, v, qp, kp, window=window)
    assert_attention_close(out, lse, want.out, want.lse, jnp.float32, "attention_kernels decode on mosaic_tpu")


def test_clean_selection():
    """Kept = listed, in range, before the length, first occurrence; sorted, packed, and the
    tail repeats the last kept block (no new DMA); nothing kept -> block 0."""
    idx = jnp.asarray([[[5, 1, 5, -2, 3, 7]], [[9, 9, 9, 9, 9, 9]]], jnp.int32)
    got, kept = clean_selection(
        idx, jnp.asarray([[5], [6]]), jnp.asarray([[7 * 8 + 1], [72]]), block_size=8, num_blocks=10
    )
    np.testing.assert_array_equal(kept, [[3], [0]])
    np.testing.assert_array_equal(got, [[[1, 3, 5, 5, 5, 5]], [[0, 0, 0, 0, 0, 0]]])


def test_sparse_bad_inputs_name_the_values():
    q, k = jnp.zeros((1, 1, 4, 32)), jnp.zeros((1, 2, 96, 32))
    idx, lens = jnp.zeros((1, 2, 3), jnp.int32), jnp.array([96])
    with pytest.raises(ValueError, match=r"block_size=12 must be a multiple of 8 for the mosaic_tpu backend"):
        sda.sparse_decode_attention(q, k, k, idx, lens, block_size=12, **TPU)
    with pytest.raises(ValueError, match=r"S=96 must be a multiple of block_size=64"):
        sda.sparse_decode_attention(q, k, k, idx, lens, block_size=64, **TPU)


# ----------------------------------------------------------------------------- KIVI quantized decode


def _cache(rng, b, n, s, h, bits, gk, gv, dtype):
    kc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=2)
    vc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=3)
    u = lambda *shape: jnp.asarray(rng.random(shape) * 2.0 / 2**bits, jnp.float32).astype(dtype)
    return (
        kc,
        u(b, n, s // gk, h),
        _normal(rng, dtype, b, n, s // gk, h),
        vc,
        u(b, n, s, h // gv),
        _normal(rng, dtype, b, n, s, h // gv),
    )


# (bits, dtype, GQA ratio, T, residual R or 0, Gk, Gv, H, block_s or None = default):
# block_s > Gk, = Gk and < Gk all appear, and T=2 meets the residual's causal rule.
QCASES = [
    (2, jnp.float32, 4, 2, 16, 32, 16, 32, 64),
    (2, jnp.bfloat16, 1, 1, 0, 128, 32, 32, 64),
    (4, jnp.float32, 1, 2, 24, 64, 32, 32, 64),
    (4, jnp.bfloat16, 4, 1, 0, 32, 16, 64, 128),
    (8, jnp.float32, 4, 1, 0, 32, 64, 64, 32),
    (8, jnp.bfloat16, 1, 2, 16, 64, 16, 32, None),
]


@pytest.mark.parametrize(
    "bits,dtype,g,t,r,gk,gv,h,bs",
    QCASES,
    ids=[f"kivi{c[0]}-{jnp.dtype(c[1]).name}-g{c[2]}-t{c[3]}-r{c[4]}" for c in QCASES],
)
def test_quantized(rng, bits, dtype, g, t, r, gk, gv, h, bs):
    b, n, s = 2, 2, 256
    cache = _cache(rng, b, n, s, h, bits, gk, gv, dtype)
    q = _normal(rng, dtype, b, t, g * n, h)
    lens = _ragged(rng, b, n, s, bs or 64)
    res = {}
    if r:
        rl = rng.integers(0, r + 1, (b, n))
        rl.flat[0], rl.flat[1] = 0, r  # an empty head (with lens 0: sees nothing) and a full window
        res = dict(
            k_res=_normal(rng, dtype, b, n, r, h),
            v_res=_normal(rng, dtype, b, n, r, h),
            res_lengths=jnp.asarray(rl, jnp.int32),
        )
    blk = None if bs is None else qda.DecodeBlockSizes(block_s=bs)
    out, lse = qda.quantized_decode_attention(q, *cache, lens, bits=bits, block_sizes=blk, **res, **TPU)
    ref_out, ref_lse = quantized_reference(q, *cache, lens, bits=bits, **res)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:3]
    assert_attention_close(out, lse, ref_out, ref_lse, dtype, f"kivi{bits} tpu")


def test_quantized_bad_inputs_name_the_values(rng):
    b, n, s, h = 1, 2, 128, 32
    kc, ks, kz, vc, vs, vz = _cache(rng, b, n, s, h, 2, 32, 16, jnp.float32)
    q, lens = jnp.zeros((b, 1, 4, h)), jnp.array([s])
    call = functools.partial(qda.quantized_decode_attention, q, kc, ks, kz, vc, vs, vz, lens, **TPU)
    with pytest.raises(ValueError, match=r"block_s=24 must divide S=128, be a multiple of 8 and of 16 \(bits=2\)"):
        call(bits=2, block_sizes=qda.DecodeBlockSizes(block_s=24))
    with pytest.raises(ValueError, match=r"block_s=8 must divide S=128, be a multiple of 8 and of 16 \(bits=2\)"):
        call(bits=2, block_sizes=qda.DecodeBlockSizes(block_s=8))
    for bits in (3, 5):
        with pytest.raises(ValueError, match=rf"bits={bits} is not supported by the quantized decode kernel"):
            call(bits=bits)
    kr = jnp.zeros((b, n, 16, h))
    with pytest.raises(ValueError, match=r"res_lengths is required"):
        call(bits=2, k_res=kr, v_res=kr)
    cache8 = _cache(rng, b, n, 96, h, 8, 12, 16, jnp.float32)  # block 12 fits S, pw and Gk: only the 8 fails
    with pytest.raises(ValueError, match=r"block_s=12 must divide S=96, be a multiple of 8 and of 4 \(bits=8\)"):
        qda.quantized_decode_attention(q, *cache8, lens, bits=8, block_sizes=qda.DecodeBlockSizes(block_s=12), **TPU)
    with pytest.raises(ValueError, match=r"no block_s in \(512, 256, 128, 64, 32, 16, 8\) fits S=96"):
        qda.quantized_decode_attention(q, *cache8, lens, bits=8, **TPU)


# ----------------------------------------------------------------------------- Mosaic lowering


@pytest.fixture
def fake_tpu_info(monkeypatch):
    """The Mosaic lowering asks the default device's TPU generation; on CPU, answer v5e."""
    try:
        from jax._src.pallas.mosaic import tpu_info

        info = functools.partial(tpu_info.get_tpu_info_for_chip, tpu_info.ChipVersion.TPU_V5E, 1)
        registry = tpu_info.registry
    except (ImportError, AttributeError) as e:  # private API moved
        pytest.skip(f"cannot stand in a TPU generation for the lowering: {e}")
    monkeypatch.setitem(registry, jax.devices()[0].device_kind, info)
    yield
    getattr(tpu_info.get_tpu_info, "cache_clear", lambda: None)()


@pytest.mark.parametrize("bits", [2, 8])
def test_quantized_mosaic_lowering(fake_tpu_info, bits):
    """The kernel lowers to a Mosaic TPU custom call at the benchmark shape (lowering only:
    Mosaic's layout passes run on a TPU host, so this does not prove it compiles). 4-bit
    differs from 2-bit only in constants."""
    from kvjax.pallas_kernels.quantized_decode_attention_tpu import _quantized_decode_tpu_jit

    b, nq, n, s, h, g, r = 8, 32, 8, 131072, 128, 32, 128
    pw, z, bf = 32 // bits, jnp.zeros, jnp.bfloat16
    args = (
        z((b, 1, nq, h), bf),
        z((b, n, s // pw, h), jnp.uint32),
        z((b, n, s // g, h), bf),
        z((b, n, s // g, h), bf),
        z((b, n, s, h // pw), jnp.uint32),
        z((b, n, s, h // g), bf),
        z((b, n, s, h // g), bf),
        z((b, n), jnp.int32),
        z((b, n, r, h), bf),
        z((b, n, r, h), bf),
        z((b, n), jnp.int32),
    )
    fn = functools.partial(
        _quantized_decode_tpu_jit, bits=bits, scale=0.1, block_sizes=qda.DecodeBlockSizes(block_s=512), interpret=False
    )
    assert "tpu_custom_call" in lower_for("tpu", fn, *args)


def test_sparse_mosaic_lowering(fake_tpu_info):
    from kvjax.pallas_kernels.sparse_decode_attention_tpu import _sparse_decode_tpu_jit

    b, nq, n, s, h = 8, 32, 8, 131072, 128
    z = jnp.zeros
    fn = functools.partial(_sparse_decode_tpu_jit, block_size=512, scale=0.1, window=4096, interpret=False)
    text = lower_for(
        "tpu",
        fn,
        z((b, 1, nq, h), jnp.bfloat16),
        z((b, n, s, h), jnp.bfloat16),
        z((b, n, s, h), jnp.bfloat16),
        z((b, n, 32), jnp.int32),
        z((b, n), jnp.int32),
        z((b, n), jnp.int32),
        z((b, n, s), jnp.int32),
        z((b, 1), jnp.int32),
    )
    assert "tpu_custom_call" in text
