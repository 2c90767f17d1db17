"""The Hopper KIVI decode kernel's epilogue and defaults on CPU: the Triton merge of the split
partials and the residual window (interpret mode) against its jnp reference, the residual window
against the reference, the default number of splits, and the code positions the kernel reads
(pallas_kernels/kivi_mgpu: merge.py, shapes.py, registers.py)."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kivi_mgpu_model import model_partials, random_cache, warp_summed

from kvjax.pallas_kernels import kivi_mgpu as mg
from kvjax.pallas_kernels import quantized_decode_attention as qda
from kvjax.pallas_kernels.kivi_mgpu import assemble, merge_partials, residual_partial
from kvjax.pallas_kernels.testing import assert_attention_close


def test_residual_window_part_matches_the_reference(rng):
    """The full-precision residual window (XLA, merged with the kernel's splits) equals the
    reference over an empty quantized part, speculative rows included (query t sees slots
    < res_len - (T - 1 - t))."""
    b, t, nq, n, h, r = 2, 3, 4, 2, 64, 32
    cache = random_cache(rng, b, n, 64, h, 2, 32, 32)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(jnp.bfloat16)
    kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
    rl = jnp.asarray([[32, 5], [2, 0]], jnp.int32)
    _, qr, _rows_q, _ = mg.query_columns(q, n)
    out, lse = residual_partial(qr, kr, vr, rl, t=t, scale=h**-0.5)
    gq = nq // n
    out = out[:, :, 0].reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, nq, h)
    lse = lse[:, :, 0].reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, nq)
    ro, rlse = qda.quantized_decode_attention_reference(
        q, *cache, jnp.zeros((b, n), jnp.int32), bits=2, k_res=kr, v_res=vr, res_lengths=rl
    )
    assert_attention_close(out, lse, ro, rlse, jnp.bfloat16, "residual part")  # the reference returns bf16


@pytest.mark.parametrize(
    "bits,t,nq,n,h,gk,gv,r,row_stride",
    [
        (2, 1, 8, 2, 128, 32, 32, 32, 16),  # GQA 4, the benchmark's groups, a residual window
        (2, 1, 8, 2, 128, 32, 32, 32, 1),  # the same, column sums per thread (row_stride 1)
        (4, 2, 4, 2, 64, 64, 64, 16, 16),  # speculative T=2, one value group
        (2, 1, 6, 2, 64, 32, 32, None, 1),  # GQA 3: rows padded to 4, no residual window
        (2, 3, 4, 2, 64, 16, 16, 48, 16),  # T=3: six rows padded to 8; a window of 3 chunks, ragged
    ],
)
def test_triton_merge_matches_the_xla_epilogue(rng, bits, t, nq, n, h, gk, gv, r, row_stride):
    """`kivi_mgpu.merge_partials` (one Triton kernel, interpret mode here) equals its jnp
    reference — `assemble` with `residual_partial` — on the kernel model's partials (column sums
    per thread, or per warp as the kernel leaves them), with empty splits, a row that sees
    nothing, and residual windows of every length up to R, read in chunks where R is not a power
    of two."""
    b, s, splits = 2, 256, 4
    cache = random_cache(rng, b, n, s, h, bits, gk, gv)
    fr = mg.to_fragment_layout(*cache, bits=bits)
    q = jnp.asarray(rng.standard_normal((b, t, nq, h)), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray([[s, 100], [0, 77]], jnp.int32)  # splits past a row's length stay empty
    qb, qr, rows_q, rows_p = mg.query_columns(q, n)
    scale = h**-0.5
    parts = tuple(
        map(
            jnp.asarray,
            model_partials(qb, fr, lengths, bits=bits, gk=gk, gv=gv, rows_q=rows_p, splits=splits, scale=scale),
        )
    )
    parts = warp_summed(parts) if row_stride == 16 else parts
    res, residual = (), None
    if r is not None:
        kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
        rl = jnp.asarray([[r, 3], [0, r - 1]], jnp.int32)  # row (1, 0) sees no token at all
        residual = residual_partial(qr, kr, vr, rl, t=t, scale=scale)
        res = (kr, vr, rl if t != 2 else jnp.asarray([r + 5, 0], jnp.int32))  # [B] lengths, one past R
        if t == 2:
            residual = residual_partial(qr, kr, vr, jnp.asarray([[r, r], [0, 0]], jnp.int32), t=t, scale=scale)
    want, want_lse = assemble(parts, rows_q=rows_q, rows_p=rows_p, gv=gv, t=t, residual=residual, row_stride=row_stride)
    got, got_lse = merge_partials(
        parts,
        qr,
        *res,
        rows_q=rows_q,
        rows_p=rows_p,
        gv=gv,
        t=t,
        scale=scale,
        row_stride=row_stride,
        out_dtype=jnp.float32,
        interpret=True,
    )
    assert_attention_close(got, got_lse, want, want_lse, jnp.float32, "triton merge")
    if r is not None:  # (row 1, head 0): nothing seen
        assert not np.isfinite(np.asarray(got_lse)[1, -1, : nq // n]).any()


@pytest.mark.parametrize(
    "b,n,s,tps,gk,want",
    [
        (8, 8, 131072, 2, 32, 8),  # the benchmark: one wave, 16k tokens a split
        (64, 8, 131072, 2, 32, 8),  # a big batch: the length bound alone
        (2, 8, 524288, 2, 32, 32),  # a long context: the length bound
        (1, 8, 131072, 2, 32, 64),  # a small batch: the wave
        (8, 8, 4096, 2, 32, 8),
        (2, 2, 256, 2, 128, 2),  # four tiles, two a step: two splits at most
    ],
)
def test_default_splits_fill_one_wave_and_bound_the_split_length(b, n, s, tps, gk, want):
    """More splits cost the merge; longer ones lose precision (the value accumulator carries the
    codes' offset: `SPLIT_TOKENS`)."""
    assert mg.default_splits(b, n, s, tps, gk) == want


@pytest.mark.parametrize(
    "bits,h,s,gk,fold,tps,stages",
    [
        (2, 128, 131072, 32, False, 4, 2),  # the benchmark at G=32: 16 KB steps, two of them
        (2, 128, 131072, 128, True, 2, 4),  # folded: 4 tiles took the kernel to 129 registers
        (4, 128, 131072, 32, False, 2, 2),
        (4, 128, 131072, 128, True, 1, 4),
        (8, 128, 131072, 32, False, 1, 2),  # 8-bit: 16 KB a tile
        (2, 64, 131072, 32, False, 4, 4),  # H=64: 8 KB steps leave room for 4 stages
        (2, 128, 384, 32, False, 2, 4),  # 6 tiles: 4 does not divide them
        (2, 128, 4096, 256, False, 4, 2),  # a key group over 4 tiles
    ],
)
def test_default_steps(bits, h, s, gk, fold, tps, stages):
    """tiles_per_step=None and stages=None: bigger steps where the key scales are not folded,
    2 stages once a step's codes take 16 KB (4 CTAs per SM in shared memory)."""
    from kvjax.pallas_kernels.kivi_mgpu import shapes

    got = shapes.default_tiles_per_step(bits, s, gk, fold)
    assert (got, shapes.default_stages(bits, h, got)) == (tps, stages)


@pytest.mark.parametrize("which", ["code_position", "value_code_position"])
@pytest.mark.parametrize("bits", [2, 4])
def test_code_positions_give_exact_offset_codes(rng, which, bits):
    """The kernel's `lop3` on (word >> shift) (a left shift when negative), modelled in numpy,
    turns position i of each 16-bit half into bf16 128 + 2^offset * code exactly, for every
    position; the values' positions sit higher in the mantissa than the keys' (smaller offset
    relative to the code: the value accumulator's rounding error, `SPLIT_TOKENS`)."""
    from kvjax.pallas_kernels.kivi_mgpu import registers as regs

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


@pytest.mark.slow
@settings(max_examples=5, deadline=None)
@given(
    t=st.integers(1, 3),
    gq=st.sampled_from([1, 2, 4]),
    gv=st.sampled_from([16, 32, 64]),
    splits=st.sampled_from([1, 2, 4]),
    r=st.sampled_from([None, 16, 32, 48, 80]),
    row_stride=st.sampled_from([1, 16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_triton_merge_hypothesis(t, gq, gv, splits, r, row_stride, seed):
    """Drawn shapes: speculative rows, GQA, value groups, split counts, residual windows and
    ragged lengths (zeros included) — the Triton merge equals its jnp reference."""
    rng = np.random.default_rng(seed)
    b, n, s, h, bits = 2, 2, 256, 64, 2
    fr = mg.to_fragment_layout(*random_cache(rng, b, n, s, h, bits, 32, gv), bits=bits)
    q = jnp.asarray(rng.standard_normal((b, t, gq * n, h)), jnp.float32).astype(jnp.bfloat16)
    lengths = jnp.asarray(rng.integers(0, s + 1, (b, n)), jnp.int32)
    qb, qr, rows_q, rows_p = mg.query_columns(q, n)
    parts = tuple(
        map(
            jnp.asarray,
            model_partials(qb, fr, lengths, bits=bits, gk=32, gv=gv, rows_q=rows_p, splits=splits, scale=h**-0.5),
        )
    )
    parts = warp_summed(parts) if row_stride == 16 else parts
    res, residual = (), None
    if r is not None:
        kr, vr = (jnp.asarray(rng.standard_normal((b, n, r, h)), jnp.float32).astype(jnp.bfloat16) for _ in range(2))
        rl = jnp.asarray(rng.integers(0, r + 1, (b, n)), jnp.int32)
        res, residual = (kr, vr, rl), residual_partial(qr, kr, vr, rl, t=t, scale=h**-0.5)
    want = assemble(parts, rows_q=rows_q, rows_p=rows_p, gv=gv, t=t, residual=residual, row_stride=row_stride)
    got = merge_partials(
        parts,
        qr,
        *res,
        rows_q=rows_q,
        rows_p=rows_p,
        gv=gv,
        t=t,
        scale=h**-0.5,
        row_stride=row_stride,
        out_dtype=jnp.float32,
        interpret=True,
    )
    assert_attention_close(*got, *want, jnp.float32, f"triton merge {t=} {gq=} {gv=} {splits=} {r=} {row_stride=}")


def test_merge_names_a_size_triton_cannot_block():
    z = jnp.zeros
    parts = (z((1, 1, 2, 64, 16)), z((1, 1, 2, 64, 16)), z((1, 1, 2, 64, 8)), z((1, 1, 2, 64, 8)))
    with pytest.raises(ValueError, match=r"row_stride=12 must be a power of two"):
        merge_partials(
            parts,
            z((1, 1, 4, 64), jnp.bfloat16),
            rows_q=4,
            rows_p=4,
            gv=32,
            t=1,
            scale=0.125,
            row_stride=12,
            interpret=True,
        )
    with pytest.raises(ValueError, match=r"row_stride=128 must be at most the partials' 64 rows"):
        merge_partials(
            parts,
            z((1, 1, 4, 64), jnp.bfloat16),
            rows_q=4,
            rows_p=4,
            gv=32,
            t=1,
            scale=0.125,
            row_stride=128,
            interpret=True,
        )
    with pytest.raises(ValueError, match=r"splits P=3 must be a power of two"):
        merge_partials(
            tuple(x[:, :, :1].repeat(3, axis=2) for x in parts),
            z((1, 1, 4, 64), jnp.bfloat16),
            rows_q=4,
            rows_p=4,
            gv=32,
            t=1,
            scale=0.125,
            interpret=True,
        )


@pytest.mark.parametrize("r,want", [(192, 64), (128, 128), (512, 128), (48, 16), (130, 2)])
def test_residual_chunk_is_the_largest_power_of_two_that_divides_the_window(r, want):
    assert mg.residual_chunk(r) == want and r % want == 0


def test_block_sizes_resolve_to_the_defaults():
    """KiviMgpuBlockSizes: None fields take the shape's defaults; given ones are kept and checked."""
    got = mg.KiviMgpuBlockSizes().resolved(b=8, n=8, s=131072, h=128, gk=32, bits=2, fold=False)
    assert got == mg.KiviMgpuBlockSizes(num_splits=8, stages=2, tiles_per_step=4)
    mine = mg.KiviMgpuBlockSizes(num_splits=4, stages=3, tiles_per_step=1)
    assert mine.resolved(b=8, n=8, s=131072, h=128, gk=32, bits=2, fold=False) == mine
    with pytest.raises(ValueError, match=r"tiles_per_step=3 must be 1, 2 or 4"):
        mg.KiviMgpuBlockSizes(tiles_per_step=3).resolved(b=1, n=1, s=4096, h=128, gk=32, bits=2, fold=False)
    hash(mg.KiviMgpuBlockSizes.get_default())  # a static jit argument
