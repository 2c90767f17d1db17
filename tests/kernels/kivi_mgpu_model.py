"""numpy model of the Hopper KIVI decode kernel (pallas_kernels/kivi_mgpu)
for the CPU tests: random KIVI caches, the fragment layout read back, and one CTA's partial sums
with the kernel's roundings (test_kernel_quantized_decode_mgpu.py, test_kernel_kivi_mgpu_merge.py)."""

import jax.numpy as jnp
import numpy as np

from kvjax.pallas_kernels import kivi_mgpu as mg
from kvjax.pallas_kernels import packing


def random_cache(rng, b, n, s, h, bits, gk, gv):
    kc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=2)
    vc = packing.pack(jnp.asarray(rng.integers(0, 2**bits, (b, n, s, h))), bits, axis=3)
    bf = lambda x: jnp.asarray(x, jnp.float32).astype(jnp.bfloat16)
    return (
        kc,
        bf(rng.random((b, n, s // gk, h)) * 0.5),
        bf(rng.standard_normal((b, n, s // gk, h))),
        vc,
        bf(rng.random((b, n, s, h // gv)) * 0.5),
        bf(rng.standard_normal((b, n, s, h // gv))),
    )


def query_scale(bits):
    """A factor for random queries against `random_cache` that keeps the scores about the same size
    for every bit width (its scales do not shrink with the code range, so 8-bit keys reach about
    60 and their f16 rounding alone would move an LSE by more than the bf16 tolerance)."""
    return 3.0 / (2**bits - 1)


def codes_from_words(words, m_rows, k_cols, bits):
    """Inverse of the fragment packing: words [..., tiles, 128*W] -> codes [..., tiles, m_rows, k_cols]."""
    rows, cols = mg.fragment_slots(m_rows, k_cols, bits)
    w = np.asarray(words).reshape(*words.shape[:-1], 128, -1)
    shifts = bits * np.arange(16 // bits)[:, None] + 16 * np.arange(2)[None, :]
    codes = (w[..., None, None] >> shifts) & ((1 << bits) - 1)  # [..., 128, W, R, 2]
    out = np.zeros((*words.shape[:-1], m_rows, k_cols), np.int64)
    out[..., rows, cols] = codes
    return out


def model_partials(qb, fr, lengths, *, bits, gk, gv, rows_q, splits, scale, lazy=False, paths=None, fold=False):
    """numpy model of the kernel's per-CTA outputs (acc [H, NB], corr/lsum/m [64, NB] per split)
    with the same roundings: dequantized keys and scaled probabilities in the operand type (bf16;
    f16 for 8-bit codes), codes offset by `code_base` (128; 1024 for 8-bit codes).
    lazy: tile by tile, keeping the running max unless a score passes it by LAZY_TAU (counts of
    rescaled and kept tiles go to `paths`). fold: the key scales folded into the query (bare codes
    times bf16(q * s), plus q . z in float32) instead of bf16 dequantized keys."""
    from kvjax.pallas_kernels.kivi_mgpu.registers import code_base

    odt, base = mg.operand_dtype(bits), code_base(bits)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.float32).astype(odt).astype(jnp.float32))
    qb = np.asarray(qb.astype(odt).astype(jnp.float32))
    b, n, ns, h = qb.shape
    nb = mg.value_columns(h // gv, rows_q)
    tiles = fr.words.shape[2]
    kcode = codes_from_words(fr.words[:, :, :, 0], 64, h, bits).reshape(b, n, tiles * 64, h)  # permuted channels
    vcode = np.swapaxes(codes_from_words(fr.words[:, :, :, 1], h, 64, bits), -1, -2).reshape(b, n, tiles * 64, h)
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
                    acc[bi, ni, si] += (base + vcode[bi, ni, tok]).T @ bv
                    corr[bi, ni, si, 0] += (p * zv[bi, ni, tok] - base * bv).sum(axis=0)
                mm[bi, ni, si] = m
    return acc, corr, lsum, mm


def warp_summed(parts):
    """The partials as the kernel leaves them with `warp_sums`: each column sum (corr, lsum)
    summed over the 16 rows of each warp, every row of the warp holding its warp's sum."""
    acc, corr, lsum, m = (np.asarray(x) for x in parts)
    per_warp = lambda x: np.repeat(x.reshape(*x.shape[:-2], 4, 16, x.shape[-1]).sum(-2), 16, axis=-2)
    return tuple(map(jnp.asarray, (acc, per_warp(corr), per_warp(lsum), m)))
