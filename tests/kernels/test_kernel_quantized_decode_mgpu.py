"""The Mosaic GPU KIVI decode kernel (pallas_kernels/kivi_mgpu) on CPU:
its fragment layout, its arithmetic (a numpy model of one CTA's partial sums, finished by the
kernel's own XLA epilogue, against the float32 reference), lowering for a CUDA target, and its
errors. The kernel itself runs only on a Hopper GPU (Mosaic GPU has no interpreter for wgmma):
`test_kernel_matches_reference_on_hopper` (skipped elsewhere) and `benchmarks/kernels_bench.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kivi_mgpu_model import codes_from_words, model_partials, query_scale, random_cache

from kvjax.pallas_kernels import kivi_mgpu as mg
from kvjax.pallas_kernels import packing
from kvjax.pallas_kernels import quantized_decode_attention as qda
from kvjax.pallas_kernels.kivi_mgpu import assemble
from kvjax.pallas_kernels.kivi_mgpu import fold as kfold
from kvjax.pallas_kernels.testing import assert_attention_close, lower_for


@pytest.mark.parametrize("m_rows,k_cols", [(64, 128), (128, 64), (64, 64), (256, 64)])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fragment_slots_hold_every_code_once(m_rows, k_cols, bits):
    rows, cols = mg.fragment_slots(m_rows, k_cols, bits)
    hits = np.zeros((m_rows, k_cols), int)
    np.add.at(hits, (rows.ravel(), cols.ravel()), 1)
    assert (hits == 1).all()
    assert rows.shape == (128, m_rows * k_cols * bits // 32 // 128, 16 // bits, 2)
    # a thread's two halves of a register are neighbouring columns of one row (one bf16x2)
    np.testing.assert_array_equal(rows[..., 0], rows[..., 1])
    np.testing.assert_array_equal(cols[..., 1], cols[..., 0] + 1)


@pytest.mark.parametrize("bits,h", [(2, 128), (4, 64), (8, 64)])
def test_to_fragment_layout_keeps_every_code(rng, bits, h):
    b, n, s = 2, 3, 128
    kc, ks, kz, vc, vs, vz = random_cache(rng, b, n, s, h, bits, 32, 32)
    fr = mg.to_fragment_layout(kc, ks, kz, vc, vs, vz, bits=bits)
    keys = np.asarray(packing.unpack(kc, bits, axis=2)).reshape(b, n, s // 64, 64, h)
    vals = np.asarray(packing.unpack(vc, bits, axis=3)).reshape(b, n, s // 64, 64, h)
    k_tiles = codes_from_words(fr.words[:, :, :, 0], 64, h, bits)  # wgmma columns = permuted channels
    np.testing.assert_array_equal(k_tiles, keys[..., mg.key_channel(np.arange(h), h)])
    v_tiles = codes_from_words(fr.words[:, :, :, 1], h, 64, bits)  # V^T: rows = channels
    np.testing.assert_array_equal(v_tiles, np.swapaxes(vals, -1, -2))
    odt = mg.operand_dtype(bits)  # scales stored in the operand type: f16 for 8-bit codes (tiny ones round)
    ks, kz, vs, vz = (x.astype(odt) for x in (ks, kz, vs, vz))
    np.testing.assert_array_equal(fr.k_sz[:, :, :, 1], kz)
    back = mg.from_fragment_layout(fr, bits=bits)
    for got, want in zip(back, (keys.reshape(b, n, s, h), vals.reshape(b, n, s, h), ks, kz, vs, vz)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert fr.words.dtype == jnp.uint32 and fr.words.shape == (b, n, s // 64, 2, 64 * h * bits // 32)
    assert fr.k_sz.dtype == fr.v_sz.dtype == mg.operand_dtype(bits)  # f16 for 8-bit codes


@pytest.mark.parametrize("h", [64, 128, 256])
def test_key_scale_loads_are_free_of_bank_conflicts(h):
    """Each thread reads its key scales (and zeros) as H/32 chunks of 8 neighbouring channels
    (16-byte loads), and in every load the four threads of a row (q = lane % 4) read chunks in
    distinct shared-memory banks (4-byte banks, 32 of them). With a thread's channels contiguous
    threads q and q + 2 would meet in the same banks)."""
    col = np.arange(h)
    ch = mg.key_channel(col, h)
    assert sorted(ch) == list(range(h))
    j, q = col // 8, (col % 8) // 2
    for v in range(h // 32):
        banks = []
        for qq in range(4):
            mine = np.sort(ch[(j // 4 == v) & (q == qq)])  # the channels of thread qq's load v
            assert len(mine) == 8 and (np.diff(mine) == 1).all() and mine[0] % 8 == 0
            banks.append({(int(mine[0]) * 2 // 4 + k) % 32 for k in range(4)})
        assert all(not (banks[a] & banks[b]) for a in range(4) for b in range(a + 1, 4)), (v, banks)


@pytest.mark.parametrize("h,gv,rows_q", [(128, 32, 4), (128, 128, 4), (128, 16, 8), (64, 32, 2)])
def test_value_scale_loads_are_free_of_bank_conflicts(h, gv, rows_q):
    """The value scales and zeros a warp reads at once (8 tokens, each thread its columns'
    groups, `expand_fn`) sit in distinct banks, or share a word: found through
    `to_fragment_layout` with every scale distinct."""
    n_gc, tiles = h // gv, 2
    nb = mg.value_columns(n_gc, rows_q)
    code = np.arange(tiles * 64 * n_gc, dtype=np.float32).reshape(1, 1, tiles * 64, n_gc)
    ksz = jnp.zeros((1, 1, tiles, h))  # 8-bit codes: f16 scales hold these integers exactly
    fr = mg.to_fragment_layout(
        jnp.zeros((1, 1, tiles * 16, h), jnp.uint32),
        ksz,
        ksz,
        jnp.zeros((1, 1, tiles * 64, h // 4), jnp.uint32),
        jnp.asarray(code),
        jnp.asarray(-1 - code),
        bits=8,
    )
    flat = np.asarray(fr.v_sz, np.float32).reshape(tiles, -1)  # a tile's elements in memory order
    for t in range(tiles):
        where = {float(x): i for i, x in enumerate(flat[t])}
        for which in (0, 1):
            for jt in range(nb // 8):
                for half in (0, 1):
                    for w in range(4):
                        words = {}
                        for lane in range(32):
                            tok = 16 * w + lane // 4 + 8 * half
                            grp = ((8 * jt + 2 * (lane % 4)) // rows_q) % n_gc
                            val = code[0, 0, t * 64 + tok, grp] * (1 if which == 0 else -1) - which
                            word = where[float(val)] * 2 // 4  # 2-byte elements, 4-byte words
                            words.setdefault(word % 32, set()).add(word)
                        assert all(len(x) == 1 for x in words.values()), (t, which, jt, half, w, words)


@pytest.mark.parametrize(
    "bits,t,nq,n,h,gk,gv",
    [
        (2, 1, 8, 2, 128, 32, 32),  # GQA 4, the benchmark's groups
        (4, 2, 4, 2, 64, 64, 64),  # speculative T=2, one value group (columns repeated to 16)
        (2, 1, 4, 2, 64, 16, 16),  # Gk = 16 (four key groups a tile)
        (2, 1, 6, 2, 64, 32, 32),  # GQA 3 (SmolLM2): rows padded to 4
        (8, 1, 8, 2, 128, 32, 32),  # 8-bit codes: f16 operands, 1024-offset codes
    ],
)
def test_kernel_arithmetic_model_matches_reference(rng, bits, t, nq, n, h, gk, gv):
    """The kernel's algebra — key-channel permutation, value scales folded into the probabilities,
    128-offset codes corrected through column sums, repeated columns — finished by the kernel's own
    XLA epilogue equals the float32 reference within bf16 tolerance."""
    b, s, splits = 2, 256, 2
    cache = random_cache(rng, b, n, s, h, bits, gk, gv)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = (jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32) * query_scale(bits)).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 150], [0, 77]][:b], jnp.int32)[:, :n]
    qb, _, rows_q, rows_p = mg.query_columns(q, n)
    scale = h**-0.5
    parts = model_partials(qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, splits=splits, scale=scale)
    out, lse = assemble(tuple(map(jnp.asarray, parts)), rows_q=rows_q, rows_p=rows_p, gv=gv, t=t)
    ro, rl = qda.quantized_decode_attention_reference(q, *cache, lengths, bits=bits)
    assert_attention_close(out, lse, ro, rl, jnp.bfloat16, f"kivi{bits} mgpu model")


@pytest.mark.parametrize("gk,t,nq", [(128, 1, 8), (64, 2, 8), (256, 1, 4)])
def test_folded_key_scales_model_matches_reference(rng, gk, t, nq):
    """The kernel's algebra where it folds the key scales (`folds_scales`: Gk >= 64): keys as bare
    codes against a query scaled per key group (bf16(q * s)), plus the zero points' part q . z in
    float32."""
    b, n, h, s, gv, bits, splits = 2, 2, 128, 512, 32, 2, 2
    cache = random_cache(rng, b, n, s, h, bits, gk, gv)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 300], [0, 77]], jnp.int32)
    qb, _, rows_q, rows_p = mg.query_columns(q, n)
    assert mg.folds_scales(gk, h, bits) and not mg.folds_scales(gk, 64, bits) and not mg.folds_scales(32, h, bits)
    assert not mg.folds_scales(gk, h, bits=8)  # f16 operands: no fold
    parts = model_partials(
        qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, splits=splits, scale=h**-0.5, fold=True
    )
    out, lse = assemble(tuple(map(jnp.asarray, parts)), rows_q=rows_q, rows_p=rows_p, gv=gv, t=t)
    ro, rl = qda.quantized_decode_attention_reference(q, *cache, lengths, bits=bits)
    assert_attention_close(out, lse, ro, rl, jnp.bfloat16, f"kivi2 G{gk} mgpu folded-scales model")


@pytest.mark.parametrize("bits,h", [(2, 128), (2, 256), (4, 128)])
def test_folded_query_cancels_the_code_factors(bits, h):
    """`fold_query_fn` divides bf16(q * s) of column tile j by the factor f_j that `unpack_fn`
    leaves on that tile's key codes (`key_offsets`), and subtracts 128 * sum(B) through zq: the
    product (128 + f * code) . B + zq then equals code . bf16(q * s) exactly (f a power of 2)."""
    rng = np.random.default_rng(0)
    f = 2.0 ** np.repeat(np.asarray(kfold.key_offsets(bits, h)), 8)  # per K position
    assert (f > 1).any() == (bits == 2)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))
    qs = bf(rng.standard_normal(h) * rng.uniform(0.01, 1, h))
    code = rng.integers(0, 2**bits, h).astype(np.float32)
    b_folded = bf(qs / f)
    np.testing.assert_array_equal(b_folded * f, qs)  # dividing by a power of 2 rounds nothing
    got = (128.0 + f * code) @ b_folded - 128.0 * b_folded.sum()
    np.testing.assert_allclose(got, code @ qs, rtol=1e-5, atol=1e-5 * np.abs(qs).sum())


def _ramped_cache(rng, b, n, s, h, bits, gk, gv):
    """A cache whose key scales grow along the context (so the running max keeps moving) and a
    query scale large enough that a tile's scores can pass the running max by LAZY_TAU (scores
    of about the same size for every bit width, so bf16 tolerances hold)."""
    q_scale = 9.0 / (2**bits - 1)
    kc, ks, kz, vc, vs, vz = random_cache(rng, b, n, s, h, bits, gk, gv)
    ramp = jnp.linspace(0.1, 2.5, s // gk)[None, None, :, None]
    ks = (ks.astype(jnp.float32) * ramp).astype(jnp.bfloat16)
    return (kc, ks, kz, vc, vs, vz), q_scale


def test_lazy_rescaling_model_matches_reference(rng):
    """FlashAttention-4's conditional rescaling (the kernel's default): tiles whose scores stay
    within LAZY_TAU of the running max keep it and skip rescaling; the result still equals the
    reference, and both kinds of tile occur."""
    b, t, nq, n, h, s, gk, gv, bits, splits = 2, 1, 8, 2, 64, 1024, 32, 32, 2, 2
    cache, q_scale = _ramped_cache(rng, b, n, s, h, bits, gk, gv)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = (jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32) * q_scale).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 700], [0, 77]], jnp.int32)
    qb, _, rows_q, rows_p = mg.query_columns(q, n)
    paths = {}
    parts = model_partials(
        qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, splits=splits, scale=h**-0.5, lazy=True, paths=paths
    )
    per = s // splits
    first_tiles = int((np.asarray(lengths)[..., None] > per * np.arange(splits)).sum())  # splits with tokens
    assert paths.get("kept", 0) > 0 and paths.get("rescaled", 0) > first_tiles, paths
    out, lse = assemble(tuple(map(jnp.asarray, parts)), rows_q=rows_q, rows_p=rows_p, gv=gv, t=t)
    ro, rl = qda.quantized_decode_attention_reference(q, *cache, lengths, bits=bits)
    assert_attention_close(out, lse, ro, rl, jnp.bfloat16, "kivi2 mgpu lazy model")


def _on_hopper():
    try:
        d = jax.devices()[0]
        return d.platform == "gpu" and getattr(d, "compute_capability", "") == "9.0" and mg.plgpu is not None
    except RuntimeError:
        return False


@pytest.mark.skipif(not _on_hopper(), reason="the Mosaic GPU kernel runs only on a Hopper GPU (CPU: the model above)")
@pytest.mark.parametrize(
    "bits,t,nq,n,h,gk,gv,ramp",
    [
        (2, 1, 8, 2, 128, 32, 32, False),
        (2, 1, 8, 2, 128, 32, 32, True),
        (4, 1, 8, 2, 128, 128, 128, True),  # key scales folded into the query
        (2, 2, 8, 2, 64, 16, 16, False),
        (4, 4, 4, 2, 128, 64, 32, True),  # folded, one key group a tile
        (2, 1, 6, 2, 64, 32, 32, True),
        (2, 1, 6, 3, 256, 256, 64, False),  # folded, a key group over 4 tiles
        (8, 1, 8, 2, 128, 32, 32, True),  # 8-bit codes: f16 operands
        (8, 2, 8, 2, 128, 128, 64, False),
        (2, 1, 8, 2, 128, 128, 32, True),  # folded, 2 tiles a step
        (2, 2, 8, 2, 128, 16, 16, True),  # four key groups a tile, 8 query rows
        (2, 1, 4, 2, 128, 32, 32, False),  # two key groups a tile, 2 query rows
    ],
)
def test_kernel_matches_reference_on_hopper(rng, bits, t, nq, n, h, gk, gv, ramp):
    """The kernel itself on the GPU against the float32 reference: ragged lengths (one row empty,
    one off the tile), a residual window, and (ramp) scores that move the running max again and
    again (both kinds of tile of the lazy rescaling)."""
    b, s, r = 2, 2048, 64
    cache, q_scale = (
        _ramped_cache(rng, b, n, s, h, bits, gk, gv)
        if ramp
        else (random_cache(rng, b, n, s, h, bits, gk, gv), query_scale(bits))
    )
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = (jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32) * q_scale).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 1000, 0][:n], [77, s - 64, 5][:n]], jnp.int32)
    kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
    rl = jnp.asarray([r, 17], jnp.int32)
    out, lse = mg.quantized_decode_attention_mgpu(q, fr, lengths, bits=bits, k_res=kr, v_res=vr, res_lengths=rl)
    ro, rlse = qda.quantized_decode_attention_reference(
        q, *cache, lengths, bits=bits, k_res=kr, v_res=vr, res_lengths=rl
    )
    assert_attention_close(out, lse, ro, rlse, jnp.bfloat16, f"kivi{bits} G{gk} mgpu ramp={ramp}")


@pytest.mark.skipif(not _on_hopper(), reason="the Mosaic GPU kernel runs only on a Hopper GPU (CPU: the model above)")
def test_kernel_with_the_xla_epilogue_on_hopper(rng):
    """Three splits (not a power of two: no Triton merge) go through the XLA epilogue."""
    b, t, nq, n, h, s, r, bits, gk = 2, 1, 8, 2, 128, 3072, 64, 2, 32
    cache, q_scale = _ramped_cache(rng, b, n, s, h, bits, gk, gk)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = (jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32) * q_scale).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 2000], [77, 0]], jnp.int32)
    kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
    rl = jnp.asarray([r, 17], jnp.int32)
    blocks = mg.KiviMgpuBlockSizes(num_splits=3, tiles_per_step=2)
    out, lse = mg.quantized_decode_attention_mgpu(
        q, fr, lengths, bits=bits, k_res=kr, v_res=vr, res_lengths=rl, block_sizes=blocks
    )
    ro, rlse = qda.quantized_decode_attention_reference(
        q, *cache, lengths, bits=bits, k_res=kr, v_res=vr, res_lengths=rl
    )
    assert_attention_close(out, lse, ro, rlse, jnp.bfloat16, "kivi2 G32 mgpu, 3 splits, XLA epilogue")


@pytest.mark.parametrize(
    "bits,t,gk,h,tps,nq,r,s,splits",
    [
        (2, 1, 32, 128, 2, 8, 64, 2048, 4),
        (4, 4, 128, 128, 1, 8, 64, 2048, 4),  # folded
        (2, 1, 32, 128, None, 8, 64, 2048, 4),
        (4, 1, 32, 128, None, 8, 64, 2048, 4),  # default steps: 4 / 2 tiles
        (2, 2, 16, 64, 4, 8, 64, 2048, 4),
        (4, 1, 256, 128, 2, 8, 64, 2048, 4),  # folded, a key group over 2 steps
        (2, 1, 32, 64, 1, 6, 64, 2048, 4),
        (2, 1, 128, 128, 2, 8, 64, 2048, 4),  # folded, 2 tiles a step
        (2, 2, 16, 128, 2, 8, 64, 2048, 4),
        (2, 1, 32, 256, 1, 4, 64, 2048, 4),
        (2, 1, 32, 128, 2, 8, 192, 2048, 4),  # the KIVI policy's window at G=32 (chunks)
        (8, 1, 32, 128, 1, 8, 64, 2048, 4),
        (8, 2, 128, 128, 1, 8, 64, 2048, 4),  # 8-bit codes: f16 operands
        (2, 1, 32, 128, 2, 8, 64, 3072, 3),  # three splits: the XLA epilogue
    ],
)
def test_lowers_for_cuda(bits, t, gk, h, tps, nq, r, s, splits):
    b, n = 2, 2
    sds = jax.ShapeDtypeStruct
    w = 64 * h * bits // 32
    dt = mg.operand_dtype(bits)
    fr = mg.KiviFragments(
        sds((b, n, s // 64, 2, w), jnp.uint32), sds((b, n, s // gk, 2, h), dt), sds((b, n, s // 64, 2, 64, h // 32), dt)
    )
    blocks = mg.KiviMgpuBlockSizes(num_splits=splits, tiles_per_step=tps)

    def fn(q, fr, lens, kr, vr, rl):
        return mg.quantized_decode_attention_mgpu(
            q, fr, lens, bits=bits, k_res=kr, v_res=vr, res_lengths=rl, block_sizes=blocks
        )

    text = lower_for(
        "cuda",
        fn,
        sds((b, t, nq, h), jnp.bfloat16),
        fr,
        sds((b,), jnp.int32),
        sds((b, n, r, h), jnp.bfloat16),
        sds((b, n, r, h), jnp.bfloat16),
        sds((b,), jnp.int32),
    )
    assert "mosaic_gpu" in text
    assert ("kivi_merge_partials" in text) == (splits & (splits - 1) == 0)  # the Triton merge, or XLA's epilogue


def _frags(b=1, n=2, s=256, h=128, bits=2, gk=32, gv=32, sz_dtype=jnp.bfloat16):
    w = 64 * h * bits // 32
    z = jnp.zeros
    return mg.KiviFragments(
        z((b, n, s // 64, 2, w), jnp.uint32),
        z((b, n, s // gk, 2, h), sz_dtype),
        z((b, n, s // 64, 2, 64, h // gv), sz_dtype),
    )


@pytest.mark.parametrize(
    "kw,fr_kw,match",
    [
        (dict(bits=3), {}, r"bits=3 is not supported by the Mosaic GPU KIVI kernel"),
        (dict(dtype=jnp.float32), {}, r"q dtype=float32 is not supported .* expected bfloat16"),
        (dict(nq=3), {}, r"query heads nq=3 must be a multiple of key/value heads n=2"),
        (dict(), dict(bits=4), r"words\(1, 2, 4, 2, 1024\) must be \[B, N, S/64, 2, 512\] for bits=2"),
        (dict(), dict(sz_dtype=jnp.float32), r"k_sz dtype=float32 is not supported .* expected bfloat16"),
        (dict(tiles_per_step=3), {}, r"tiles_per_step=3 must be 1, 2 or 4"),
        (dict(), dict(gv=1), r"value group Gv=1 must be even and divide H=128"),
        (dict(), dict(gk=8), r"key group Gk=8 must be 16, 32, 64 or a multiple of 64"),
        (dict(bits=8), dict(bits=8), r"k_sz dtype=bfloat16 is not supported .* for bits=8; expected float16"),
        (dict(num_splits=0), {}, r"multiple of num_splits \* tiles_per_step = 0 \* 2"),
        (dict(stages=0), {}, r"stages=0 must be at least 1"),
    ],
)
def test_bad_input_names_the_value(kw, fr_kw, match):
    bits = kw.get("bits", 2)
    q = jnp.zeros((1, 1, kw.get("nq", 8), kw.get("h", 128)), kw.get("dtype", jnp.bfloat16))
    blocks = mg.KiviMgpuBlockSizes(
        num_splits=kw.get("num_splits"), stages=kw.get("stages"), tiles_per_step=kw.get("tiles_per_step", 2)
    )
    with pytest.raises(ValueError, match=match):
        mg.quantized_decode_attention_mgpu(q, _frags(**fr_kw), jnp.array([256]), bits=bits, block_sizes=blocks)


@pytest.mark.parametrize(
    "kw,match",
    [
        (
            dict(num_splits=4),
            r"num_splits= moved into block_sizes: pass block_sizes=KiviMgpuBlockSizes\(num_splits=4\)",
        ),
        (dict(lazy_rescale=False), r"lazy_rescale= was removed: the running max is always rescaled lazily"),
        (dict(merge="xla"), r"merge= was removed: the Triton merge runs where H and the splits are powers of two"),
        (dict(tile=2), r"unexpected keyword argument 'tile'"),
    ],
)
def test_old_keywords_name_their_replacement(kw, match):
    with pytest.raises(TypeError, match=match):
        mg.quantized_decode_attention_mgpu(
            jnp.zeros((1, 1, 8, 128), jnp.bfloat16), _frags(), jnp.array([256]), bits=2, **kw
        )


def test_scales_of_the_wrong_layout_name_it():
    """A cache with the value scales in the other order (v_sz [B, N, S/64, 2, H/Gv, 64]) or with key scales
    of the wrong shape is refused with the expected layout, not read in the wrong order."""
    fr = _frags()
    q = jnp.zeros((1, 1, 8, 128), jnp.bfloat16)
    old = fr._replace(v_sz=jnp.swapaxes(fr.v_sz, 4, 5))  # [1, 2, 4, 2, 4, 64]
    with pytest.raises(ValueError, match=r"v_sz\(1, 2, 4, 2, 4, 64\) must be \[B, N, S/64, 2, 64, H/Gv\]"):
        mg.quantized_decode_attention_mgpu(q, old, jnp.array([256]), bits=2)
    bad_k = fr._replace(k_sz=fr.k_sz[:, :, :, :, :64])
    with pytest.raises(ValueError, match=r"k_sz\(1, 2, 8, 2, 64\) must be \[B, N, S/Gk, 2, H\] with .* H=128"):
        mg.quantized_decode_attention_mgpu(q, bad_k, jnp.array([256]), bits=2)


def test_to_fragment_layout_rejects_a_context_off_the_tile():
    kc = jnp.zeros((1, 1, 96 // 16, 128), jnp.uint32)
    vc = jnp.zeros((1, 1, 96, 128 // 16), jnp.uint32)
    sc = jnp.zeros((1, 1, 3, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"S % 64 == 0 and H % 64 == 0; got S=96, H=128"):
        mg.to_fragment_layout(kc, sc, sc, vc, jnp.zeros((1, 1, 96, 4)), jnp.zeros((1, 1, 96, 4)), bits=2)


def test_lengths_of_the_wrong_shape_name_it():
    q = jnp.zeros((1, 1, 8, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"lengths must be \[B\]=\(1,\) or \[B, N\]=\(1, 2\); got shape \(3,\)"):
        mg.quantized_decode_attention_mgpu(q, _frags(), jnp.array([256, 1, 2]), bits=2)
