"""Host-side mask -> block metadata: every visible element lies in a listed block, no listed
block is empty, and blocks not flagged partial are fully visible."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax.pallas_kernels.block_mask import MaskSpec, build_block_metadata, element_mask


def _check(spec, t, s, bq, bk, bm=None):
    meta = build_block_metadata(spec, t, s, bq, bk, bm)
    vis = element_mask(spec, t, s, bm)  # [Hm, T, S]
    hm, nqb, nkb = vis.shape[0], t // bq, s // bk
    blocks = vis.reshape(hm, nqb, bq, nkb, bk)
    any_vis, all_vis = blocks.any(axis=(2, 4)), blocks.all(axis=(2, 4))
    assert meta.counts.shape == (hm, nqb) and meta.num_kv_blocks == nkb
    for h in range(hm):
        for i in range(nqb):
            c = meta.counts[h, i]
            listed = meta.indices[h, i, :c]
            assert list(listed) == sorted(set(listed)), "indices must be sorted and unique"
            np.testing.assert_array_equal(np.sort(listed), np.nonzero(any_vis[h, i])[0])
            np.testing.assert_array_equal(meta.partial[h, i, :c].astype(bool), ~all_vis[h, i, listed])
            if c:  # padding repeats the last block (a pipelined kernel re-uses it)
                assert np.all(meta.indices[h, i, c:] == listed[-1])
    assert 0.0 <= meta.density <= 1.0
    return meta


@pytest.mark.parametrize(
    "spec",
    [
        MaskSpec(),
        MaskSpec(causal=True),
        MaskSpec(causal=True, window=40),
        MaskSpec(causal=True, q_offset=96),
        MaskSpec(window=17, q_offset=5),
    ],
)
def test_structural_masks(spec):
    _check(spec, 128, 256, 32, 64)


def test_causal_density_and_partial_diagonal():
    meta = _check(MaskSpec(causal=True), 256, 256, 64, 64)
    assert meta.counts.tolist() == [[1, 2, 3, 4]]
    assert meta.partial[0, 3, :4].tolist() == [0, 0, 0, 1]  # only the diagonal block is masked
    assert meta.density == pytest.approx(10 / 16)


@settings(max_examples=30, deadline=None)
@given(
    causal=st.booleans(),
    window=st.one_of(st.none(), st.integers(1, 300)),
    q_off=st.integers(0, 64),
    nqb=st.integers(1, 4),
    nkb=st.integers(1, 5),
    heads=st.sampled_from([0, 1, 3]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_masks(causal, window, q_off, nqb, nkb, heads, seed):
    rng = np.random.default_rng(seed)
    spec = MaskSpec(causal=causal, window=window, q_offset=q_off, mask_block=(32, 64) if heads else None)
    bm = None
    if heads:
        bm = rng.random((heads, nqb, nkb)) < 0.5
        bm = bm[0] if heads == 1 else bm
    _check(spec, 32 * nqb, 64 * nkb, 16, 32, bm)


def test_errors_print_values():
    with pytest.raises(ValueError, match=r"q_len=100 must be a multiple of block_q=64"):
        build_block_metadata(MaskSpec(), 100, 128, 64, 64)
    with pytest.raises(ValueError, match=r"kv_len=130 must be a multiple of block_kv=64"):
        build_block_metadata(MaskSpec(), 128, 130, 64, 64)
    with pytest.raises(ValueError, match=r"window=0 must be >= 1"):
        MaskSpec(window=0)
    with pytest.raises(ValueError, match=r"q_offset=-1"):
        MaskSpec(q_offset=-1)
    with pytest.raises(ValueError, match=r"needs MaskSpec.mask_block"):
        build_block_metadata(MaskSpec(), 128, 128, 64, 64, np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"mask_block=\(32, 32\) must be a multiple of the kernel blocks"):
        build_block_metadata(MaskSpec(mask_block=(32, 32)), 128, 128, 64, 64, np.ones((4, 4), bool))
    with pytest.raises(ValueError, match=r"covers \(128, 64\), expected \(q_len, kv_len\)=\(128, 128\)"):
        build_block_metadata(MaskSpec(mask_block=(64, 32)), 128, 128, 64, 32, np.ones((2, 2), bool))
