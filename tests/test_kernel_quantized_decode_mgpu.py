"""The Mosaic GPU KIVI decode kernel (pallas_kernels/quantized_decode_attention_mgpu.py) on CPU:
its fragment layout, its arithmetic (a numpy model of one CTA's partial sums, finished by the
kernel's own XLA epilogue, against the float32 reference), lowering for a CUDA target, and its
errors. The kernel itself runs only on a Hopper GPU (Mosaic GPU has no interpreter for wgmma):
`test_kernel_matches_reference_on_hopper` (skipped elsewhere) and `benchmarks/kernels_bench.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.pallas_kernels import packing
from kvjax.pallas_kernels import quantized_decode_attention as qda
from kvjax.pallas_kernels import _kivi_mgpu_fold as kfold
from kvjax.pallas_kernels import quantized_decode_attention_mgpu as mg
from kvjax.pallas_kernels._kivi_mgpu_epilogue import assemble, residual_partial
from kvjax.pallas_kernels.testing import assert_attention_close, lower_for


def _cache(rng, b, n, s, h, bits, gk, gv):
    kc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=2)
    vc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=3)
    bf = lambda x: jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    return (kc, bf(rng.random((b, n, s // gk, h)) * 0.5), bf(rng.standard_normal((b, n, s // gk, h))),
            vc, bf(rng.random((b, n, s, h // gv)) * 0.5), bf(rng.standard_normal((b, n, s, h // gv))))


def _codes_from_words(words, m_rows, k_cols, bits):
    """Inverse of the fragment packing: words [..., tiles, 128*W] -> codes [..., tiles, m_rows, k_cols]."""
    rows, cols = mg.fragment_slots(m_rows, k_cols, bits)
    w = np.asarray(words).reshape(*words.shape[:-1], 128, -1)
    shifts = bits * np.arange(16 // bits)[:, None] + 16 * np.arange(2)[None, :]
    codes = (w[..., None, None] >> shifts) & ((1 << bits) - 1)  # [..., 128, W, R, 2]
    out = np.zeros((*words.shape[:-1], m_rows, k_cols), np.int64)
    out[..., rows, cols] = codes
    return out


@pytest.mark.parametrize("m_rows,k_cols", [(64, 128), (128, 64), (64, 64), (256, 64)])
@pytest.mark.parametrize("bits", [2, 4])
def test_fragment_slots_hold_every_code_once(m_rows, k_cols, bits):
    rows, cols = mg.fragment_slots(m_rows, k_cols, bits)
    hits = np.zeros((m_rows, k_cols), int)
    np.add.at(hits, (rows.ravel(), cols.ravel()), 1)
    assert (hits == 1).all()
    assert rows.shape == (128, m_rows * k_cols * bits // 32 // 128, 16 // bits, 2)
    # a thread's two halves of a register are neighbouring columns of one row (one bf16x2)
    np.testing.assert_array_equal(rows[..., 0], rows[..., 1])
    np.testing.assert_array_equal(cols[..., 1], cols[..., 0] + 1)


@pytest.mark.parametrize("bits,h", [(2, 128), (4, 64)])
def test_to_fragment_layout_keeps_every_code(rng, bits, h):
    b, n, s = 2, 3, 128
    kc, ks, kz, vc, vs, vz = _cache(rng, b, n, s, h, bits, 32, 32)
    fr = mg.to_fragment_layout(kc, ks, kz, vc, vs, vz, bits=bits)
    keys = np.asarray(packing.unpack(kc, bits, axis=2)).reshape(b, n, s // 64, 64, h)
    vals = np.asarray(packing.unpack(vc, bits, axis=3)).reshape(b, n, s // 64, 64, h)
    k_tiles = _codes_from_words(fr.words[:, :, :, 0], 64, h, bits)  # wgmma columns = permuted channels
    np.testing.assert_array_equal(k_tiles, keys[..., mg.key_channel(np.arange(h), h)])
    v_tiles = _codes_from_words(fr.words[:, :, :, 1], h, 64, bits)  # V^T: rows = channels
    np.testing.assert_array_equal(v_tiles, np.swapaxes(vals, -1, -2))
    np.testing.assert_array_equal(fr.k_sz[:, :, :, 1], kz)
    back = mg.from_fragment_layout(fr, bits=bits)
    for got, want in zip(back, (keys.reshape(b, n, s, h), vals.reshape(b, n, s, h), ks, kz, vs, vz)):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert fr.words.dtype == jnp.uint32 and fr.words.shape == (b, n, s // 64, 2, 64 * h * bits // 32)


def _model_partials(qb, fr, lengths, *, bits, gk, gv, rows_q, splits, scale, lazy=False, paths=None, fold=False):
    """numpy model of the kernel's per-CTA outputs (acc [H, NB], corr/lsum/m [64, NB] per split)
    with the same roundings: bf16 dequantized keys, bf16 scaled probabilities, 128-offset codes.
    lazy: tile by tile, keeping the running max unless a score passes it by LAZY_TAU (counts of
    rescaled and kept tiles go to `paths`). fold: the key scales folded into the query (bare codes
    times bf16(q * s), plus q . z in float32) instead of bf16 dequantized keys."""
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
    qb = np.asarray(qb.astype(jnp.float32))
    b, n, ns, h = qb.shape
    nb = mg._value_columns(h // gv, rows_q)
    tiles = fr.words.shape[2]
    kcode = _codes_from_words(fr.words[:, :, :, 0], 64, h, bits).reshape(b, n, tiles * 64, h)  # permuted channels
    vcode = np.swapaxes(_codes_from_words(fr.words[:, :, :, 1], h, 64, bits), -1, -2).reshape(b, n, tiles * 64, h)
    perm = mg.key_channel(np.arange(h), h)
    ks = np.repeat(np.asarray(fr.k_sz[:, :, :, 0], np.float32), gk, axis=2)[..., perm]
    kz = np.repeat(np.asarray(fr.k_sz[:, :, :, 1], np.float32), gk, axis=2)[..., perm]
    k = bf(kcode * ks + kz)  # [B,N,S,H]
    grp = (np.arange(nb) // rows_q) % (h // gv)
    *_, vs, vz = mg.from_fragment_layout(fr, bits=bits)
    sv = np.asarray(vs, np.float32)[..., grp]  # [B,N,S,NB]
    zv = np.asarray(vz, np.float32)[..., grp]
    per = tiles * 64 // splits
    acc = np.zeros((b, n, splits, h, nb), np.float32)
    corr = np.zeros((b, n, splits, 64, nb), np.float32)
    lsum, mm = (np.zeros((b, n, splits, 64, ns), np.float32) for _ in range(2))
    lengths = np.asarray(lengths)
    for bi in range(b):
        for ni in range(n):
            for si in range(splits):
                sl = slice(si * per, (si + 1) * per)
                if fold:
                    qs = bf(qb[bi, ni][None] * ks[bi, ni, sl][:, None])  # [per, NS, H]: B = q * s per token's group
                    raw = np.einsum("th,tjh->tj", kcode[bi, ni, sl], qs) + kz[bi, ni, sl] @ qb[bi, ni].T
                else:
                    raw = k[bi, ni, sl] @ qb[bi, ni].T
                logits = raw * scale * np.log2(np.e)  # [per, NS]
                pos = np.arange(si * per, (si + 1) * per)
                logits = np.where((pos < lengths[bi, ni])[:, None], logits, -np.inf)
                m = np.full(ns, -1e30, np.float32)
                for tile in range(per // 64) if lazy else [None]:
                    rows = slice(None) if tile is None else slice(64 * tile, 64 * tile + 64)
                    st = logits[rows]
                    if tile is None or (st > m + mg.LAZY_TAU).any():
                        m_new = np.maximum(m, st.max(axis=0))
                        alpha = np.exp2(m - m_new)
                        lsum[bi, ni, si, 0] *= alpha
                        acc[bi, ni, si] *= np.tile(alpha, nb // ns)
                        corr[bi, ni, si, 0] *= np.tile(alpha, nb // ns)
                        m = m_new
                        paths is None or paths.update(rescaled=paths.get("rescaled", 0) + 1)
                    else:
                        paths is None or paths.update(kept=paths.get("kept", 0) + 1)
                    p = np.exp2(st - m)
                    lsum[bi, ni, si, 0] += p.sum(axis=0)
                    p = np.tile(p, (1, nb // ns))  # one copy per value group
                    tok = slice(si * per, (si + 1) * per)
                    tok = tok if tile is None else slice(si * per + 64 * tile, si * per + 64 * tile + 64)
                    bv = bf(p * sv[bi, ni, tok])
                    acc[bi, ni, si] += (128.0 + vcode[bi, ni, tok]).T @ bv
                    corr[bi, ni, si, 0] += (p * zv[bi, ni, tok] - 128.0 * bv).sum(axis=0)
                mm[bi, ni, si] = m
    return acc, corr, lsum, mm


@pytest.mark.parametrize("bits,t,nq,n,h,gk,gv", [
    (2, 1, 8, 2, 128, 32, 32),     # GQA 4, the benchmark's groups
    (4, 2, 4, 2, 64, 64, 64),      # speculative T=2, one value group (columns repeated to 16)
    (2, 1, 4, 2, 64, 16, 16),      # Gk = 16 (four key groups a tile)
    (2, 1, 6, 2, 64, 32, 32),      # GQA 3 (SmolLM2): rows padded to 4
])
def test_kernel_arithmetic_model_matches_reference(rng, bits, t, nq, n, h, gk, gv):
    """The kernel's algebra — key-channel permutation, value scales folded into the probabilities,
    128-offset codes corrected through column sums, repeated columns — finished by the kernel's own
    XLA epilogue equals the float32 reference within bf16 tolerance."""
    b, s, splits = 2, 256, 2
    cache = _cache(rng, b, n, s, h, bits, gk, gv)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 150], [0, 77]][:b], jnp.int32)[:, :n]
    qb, _, rows_q, rows_p = mg.query_columns(q, n)
    scale = h**-0.5
    parts = _model_partials(qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, splits=splits, scale=scale)
    out, lse = assemble(tuple(map(jnp.asarray, parts)), rows_q=rows_q, rows_p=rows_p, gv=gv, t=t)
    ro, rl = qda.quantized_decode_attention_reference(q, *cache, lengths, bits=bits)
    assert_attention_close(out, lse, ro, rl, jnp.bfloat16, f"kivi{bits} mgpu model")


@pytest.mark.parametrize("gk,t,nq", [(128, 1, 8), (32, 1, 8), (16, 1, 4), (32, 2, 8)])
def test_folded_key_scales_model_matches_reference(rng, gk, t, nq):
    """The kernel's algebra with `fold_scales`: keys as bare codes against a query scaled per
    key group (bf16(q * s)), plus the zero points' part q . z in float32; several key groups a
    tile (Gk < 64) included."""
    b, n, h, s, gv, bits, splits = 2, 2, 128, 512, 32, 2, 2
    cache = _cache(rng, b, n, s, h, bits, gk, gv)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 300], [0, 77]], jnp.int32)
    qb, _, rows_q, rows_p = mg.query_columns(q, n)
    assert mg.can_fold_scales(gk, h, t, nq // n) and not mg.can_fold_scales(gk, 64, t, nq // n)
    parts = _model_partials(qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, splits=splits, scale=h**-0.5,
                            fold=True)
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
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))  # noqa: E731
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
    kc, ks, kz, vc, vs, vz = _cache(rng, b, n, s, h, bits, gk, gv)
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
    parts = _model_partials(qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, splits=splits, scale=h**-0.5,
                            lazy=True, paths=paths)
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
@pytest.mark.parametrize("bits,t,nq,n,h,gk,gv,lazy,ramp", [
    (2, 1, 8, 2, 128, 32, 32, True, False),
    (2, 1, 8, 2, 128, 32, 32, True, True),
    (2, 1, 8, 2, 128, 32, 32, False, True),
    (4, 1, 8, 2, 128, 128, 128, True, True),
    (2, 2, 8, 2, 64, 16, 16, True, False),
    (4, 4, 4, 2, 128, 64, 32, True, True),
    (2, 1, 6, 2, 64, 32, 32, True, True),
    (2, 1, 6, 3, 256, 256, 64, True, False),
    (2, 1, 8, 2, 128, 128, 32, True, True),     # key scales folded into the query, one group a tile
    (2, 2, 8, 2, 128, 16, 16, True, True),      # folded, four key groups a tile, 8 query rows
    (2, 1, 4, 2, 128, 32, 32, True, False),     # folded, two key groups a tile, 2 query rows
])
def test_kernel_matches_reference_on_hopper(rng, bits, t, nq, n, h, gk, gv, lazy, ramp):
    """The kernel itself on the GPU against the float32 reference: ragged lengths (one row empty,
    one off the tile), a residual window, and (ramp) scores that move the running max again and
    again, with the lazy rescaling on and off."""
    b, s, r = 2, 2048, 64
    cache, q_scale = _ramped_cache(rng, b, n, s, h, bits, gk, gv) if ramp else (_cache(rng, b, n, s, h, bits, gk, gv), 1.0)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = (jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32) * q_scale).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 1000, 0][:n], [77, s - 64, 5][:n]], jnp.int32)
    kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
    rl = jnp.asarray([r, 17], jnp.int32)
    out, lse = mg.quantized_decode_attention_mgpu(q, fr, lengths, bits=bits, k_res=kr, v_res=vr, res_lengths=rl,
                                                  lazy_rescale=lazy)
    ro, rlse = qda.quantized_decode_attention_reference(q, *cache, lengths, bits=bits, k_res=kr, v_res=vr,
                                                        res_lengths=rl)
    assert_attention_close(out, lse, ro, rlse, jnp.bfloat16, f"kivi{bits} G{gk} mgpu lazy={lazy} ramp={ramp}")
    variants = [dict(lazy_rescale=False)] if lazy else []  # a rescale every tile
    variants.append(dict(lazy_rescale=lazy, merge="xla"))  # the XLA epilogue instead of the Triton merge
    if mg.can_fold_scales(gk, h, t, nq // n):  # dequantized keys against a scaled query, the other way round
        variants.append(dict(lazy_rescale=lazy, fold_scales=not mg.folds_by_default(gk, h, t, nq // n)))
    for kw in variants:  # equal up to bf16 roundings of the probabilities / of the keys or the scaled query
        other, _ = mg.quantized_decode_attention_mgpu(q, fr, lengths, bits=bits, k_res=kr, v_res=vr, res_lengths=rl,
                                                      **kw)
        o, e = np.asarray(out, np.float32), np.asarray(other, np.float32)
        assert np.linalg.norm(o - e) <= 1e-2 * np.linalg.norm(e), kw


@pytest.mark.parametrize("bits,t,gk,h,tps,nq,fold", [
    (2, 1, 32, 128, 2, 8, None), (4, 4, 128, 128, 1, 8, None), (2, 2, 16, 64, 4, 8, None), (4, 1, 256, 128, 2, 8, None),
    (2, 1, 32, 64, 1, 6, None), (2, 1, 128, 128, 2, 8, False),
    (2, 1, 32, 128, 2, 8, True), (2, 2, 16, 128, 2, 8, True), (2, 1, 32, 256, 1, 4, True),  # several groups a tile
])
def test_lowers_for_cuda(bits, t, gk, h, tps, nq, fold):
    b, n, s, r = 2, 2, 2048, 64
    sds = jax.ShapeDtypeStruct
    w = 64 * h * bits // 32
    fr = mg.KiviFragments(sds((b, n, s // 64, 2, w), jnp.uint32), sds((b, n, s // gk, 2, h), jnp.bfloat16),
                          sds((b, n, s // 64, 2, h // 32, 64), jnp.bfloat16))

    def fn(q, fr, lens, kr, vr, rl):
        return mg.quantized_decode_attention_mgpu(q, fr, lens, bits=bits, k_res=kr, v_res=vr, res_lengths=rl,
                                                  num_splits=4, tiles_per_step=tps, fold_scales=fold)

    text = lower_for("cuda", fn, sds((b, t, nq, h), jnp.bfloat16), fr, sds((b,), jnp.int32),
                     sds((b, n, r, h), jnp.bfloat16), sds((b, n, r, h), jnp.bfloat16), sds((b,), jnp.int32))
    assert "mosaic_gpu" in text


def _frags(b=1, n=2, s=256, h=128, bits=2, gk=32, gv=32, sz_dtype=jnp.bfloat16):
    w = 64 * h * bits // 32
    z = jnp.zeros
    return mg.KiviFragments(z((b, n, s // 64, 2, w), jnp.uint32), z((b, n, s // gk, 2, h), sz_dtype),
                            z((b, n, s // 64, 2, h // gv, 64), sz_dtype))


@pytest.mark.parametrize("kw,fr_kw,match", [
    (dict(bits=3), {}, r"bits=3 is not supported by the Mosaic GPU KIVI kernel"),
    (dict(dtype=jnp.float32), {}, r"q dtype=float32 is not supported .* expected bfloat16"),
    (dict(nq=3), {}, r"query heads nq=3 must be a multiple of key/value heads n=2"),
    (dict(), dict(bits=4), r"words\(1, 2, 4, 2, 1024\) must be \[B, N, S/64, 2, 512\] for bits=2"),
    (dict(), dict(sz_dtype=jnp.float32), r"k_sz dtype=float32 is not supported .* expected bfloat16"),
    (dict(tiles_per_step=3), {}, r"tiles_per_step=3 must be 1, 2 or 4"),
    (dict(), dict(gv=1), r"value group Gv=1 must be even and divide H=128"),
    (dict(), dict(gk=8), r"key group Gk=8 must be 16, 32, 64 or a multiple of 64"),
    (dict(fold_scales=True, h=64), dict(h=64), r"fold_scales=True needs a head_dim H of 128 or 256 \(got 64\)"),
    (dict(merge="cuda"), {}, r"merge='cuda' must be 'xla', or 'triton' where H=128, num_splits=2"),
])
def test_bad_input_names_the_value(kw, fr_kw, match):
    bits = kw.get("bits", 2)
    q = jnp.zeros((1, 1, kw.get("nq", 8), kw.get("h", 128)), kw.get("dtype", jnp.bfloat16))
    with pytest.raises(ValueError, match=match):
        mg.quantized_decode_attention_mgpu(q, _frags(**fr_kw), jnp.array([256]), bits=bits,
                                           tiles_per_step=kw.get("tiles_per_step", 2),
                                           fold_scales=kw.get("fold_scales"), merge=kw.get("merge"))


def test_to_fragment_layout_rejects_a_context_off_the_tile():
    kc = jnp.zeros((1, 1, 96 // 16, 128), jnp.uint32)
    vc = jnp.zeros((1, 1, 96, 128 // 16), jnp.uint32)
    sc = jnp.zeros((1, 1, 3, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"S % 64 == 0 and H % 64 == 0; got S=96, H=128"):
        mg.to_fragment_layout(kc, sc, sc, vc, jnp.zeros((1, 1, 96, 4)), jnp.zeros((1, 1, 96, 4)), bits=2)


def test_residual_window_part_matches_the_reference(rng):
    """The full-precision residual window (XLA, merged with the kernel's splits) equals the
    reference over an empty quantized part, speculative rows included (query t sees slots
    < res_len - (T - 1 - t))."""
    b, t, nq, n, h, r = 2, 3, 4, 2, 64, 32
    cache = _cache(rng, b, n, 64, h, 2, 32, 32)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(jnp.bfloat16)
    kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
    rl = jnp.asarray([[32, 5], [2, 0]], jnp.int32)
    _, qr, rows_q, _ = mg.query_columns(q, n)
    out, lse = residual_partial(qr, kr, vr, rl, t=t, scale=h**-0.5)
    gq = nq // n
    out = out[:, :, 0].reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, nq, h)
    lse = lse[:, :, 0].reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, nq)
    ro, rlse = qda.quantized_decode_attention_reference(q, *cache, jnp.zeros((b, n), jnp.int32), bits=2, k_res=kr,
                                                        v_res=vr, res_lengths=rl)
    assert_attention_close(out, lse, ro, rlse, jnp.bfloat16, "residual part")  # the reference returns bf16


@pytest.mark.parametrize("bits,t,nq,n,h,gk,gv,r", [
    (2, 1, 8, 2, 128, 32, 32, 32),    # GQA 4, the benchmark's groups, a residual window
    (4, 2, 4, 2, 64, 64, 64, 16),     # speculative T=2, one value group
    (2, 1, 6, 2, 64, 32, 32, None),   # GQA 3: rows padded to 4, no residual window
    (2, 3, 4, 2, 64, 16, 16, 32),     # T=3: six rows padded to 8; ragged windows
])
def test_triton_merge_matches_the_xla_epilogue(rng, bits, t, nq, n, h, gk, gv, r):
    """`_kivi_mgpu_merge.merge_partials` (one Triton kernel, interpret mode here) equals its jnp
    reference — `assemble` with `residual_partial` — on the kernel model's partials, with empty
    splits, a row that sees nothing, and residual windows of every length up to R."""
    from kvjax.pallas_kernels._kivi_mgpu_merge import merge_partials

    b, s, splits = 2, 256, 4
    cache = _cache(rng, b, n, s, h, bits, gk, gv)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 100], [0, 77]], jnp.int32)  # splits past a row's length stay empty
    qb, qr, rows_q, rows_p = mg.query_columns(q, n)
    scale = h**-0.5
    parts = tuple(map(jnp.asarray, _model_partials(qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p,
                                                   splits=splits, scale=scale)))
    res, residual = (), None
    if r is not None:
        kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
        rl = jnp.asarray([[r, 3], [0, r - 1]], jnp.int32)  # row (1, 0) sees no token at all
        residual = residual_partial(qr, kr, vr, rl, t=t, scale=scale)
        res = (kr, vr, rl if t != 2 else jnp.asarray([r + 5, 0], jnp.int32))  # [B] lengths, one past R
        if t == 2:
            residual = residual_partial(qr, kr, vr, jnp.asarray([[r, r], [0, 0]], jnp.int32), t=t, scale=scale)
    want, want_lse = assemble(parts, rows_q=rows_q, rows_p=rows_p, gv=gv, t=t, residual=residual)
    got, got_lse = merge_partials(parts, qr, *res, rows_q=rows_q, rows_p=rows_p, gv=gv, t=t, scale=scale,
                                  out_dtype=jnp.float32, interpret=True)
    assert_attention_close(got, got_lse, want, want_lse, jnp.float32, "triton merge")
    if r is not None:  # (row 1, head 0): nothing seen
        assert not np.isfinite(np.asarray(got_lse)[1, -1, : nq // n]).any()


@pytest.mark.parametrize("b,n,s,tps,gk,want", [
    (8, 8, 131072, 2, 32, 8),     # the benchmark: one wave, 16k tokens a split
    (64, 8, 131072, 2, 32, 8),    # a big batch: the length bound alone
    (2, 8, 524288, 2, 32, 32),    # a long context: the length bound
    (1, 8, 131072, 2, 32, 64),    # a small batch: the wave
    (8, 8, 4096, 2, 32, 8),
    (2, 2, 256, 2, 128, 2),       # four tiles, two a step: two splits at most
])
def test_default_splits_fill_one_wave_and_bound_the_split_length(b, n, s, tps, gk, want):
    """More splits cost the merge; longer ones lose precision (the value accumulator carries the
    codes' offset: `SPLIT_TOKENS`)."""
    assert mg.default_splits(b, n, s, tps, gk) == want


@pytest.mark.parametrize("which", ["code_position", "value_code_position"])
@pytest.mark.parametrize("bits", [2, 4])
def test_code_positions_give_exact_offset_codes(rng, which, bits):
    """The kernel's `lop3` on (word >> shift) (a left shift when negative), modelled in numpy,
    turns position i of each 16-bit half into bf16 128 + 2^offset * code exactly, for every
    position; the values' positions sit higher in the mantissa than the keys' (smaller offset
    relative to the code: the value accumulator's rounding error, `SPLIT_TOKENS`)."""
    from kvjax.pallas_kernels import _kivi_mgpu_registers as regs

    pos = getattr(regs, which)
    words = rng.integers(0, 2**32, 256, dtype=np.uint64).astype(np.uint32)
    for i in range(16 // bits):
        shift, offset = pos(bits, i)
        x = words >> np.uint32(shift) if shift >= 0 else words << np.uint32(-shift)
        mask = np.uint32(((1 << bits) - 1) * 0x00010001 << offset)
        out = (x & mask) | np.uint32(0x43004300)
        for half in (0, 1):
            got = ((out >> np.uint32(16 * half)) & np.uint32(0xFFFF)).astype(np.uint32) << np.uint32(16)
            code = (words >> np.uint32(16 * half + bits * i)) & np.uint32((1 << bits) - 1)
            np.testing.assert_array_equal(got.view(np.float32), 128.0 + 2.0**offset * code, err_msg=f"{i=} {half=}")
        assert 128 + 2**offset * ((1 << bits) - 1) < 256
    if which == "value_code_position":
        assert min(pos(bits, i)[1] for i in range(16 // bits)) >= 2
