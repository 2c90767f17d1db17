"""KIVI with `layout="fragments"` (the Hopper kernel's storage, kvjax.quant.kivi): on CPU the
reference path reads it back, so decode must match the standard layout up to the bf16
rounding of the scales; on a Hopper GPU decode goes through the Mosaic GPU kernel and must
match the reference over the same cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_FRAGMENTS

from kvjax import attention
from kvjax.pallas_kernels import _compat
from kvjax.pallas_kernels import kivi_mgpu as mgpu
from kvjax.pallas_kernels.testing import tolerance
from kvjax.policies import parse_policy
from kvjax.policies.base import PolicyError
from kvjax.quant import dequantize_state
from kvjax.state import LayerContext, SlotKV

CFG = TINY_FRAGMENTS


def ctx(impl=None, new=160):
    return LayerContext(0, CFG, "decode", True, 200, new, impl)


def _slots(rng, b=2, n=2, s=200, h=64, lengths=(200, 131), dtype=jnp.float32):
    k = rng.standard_normal((b, n, s, h)).astype(np.float32)
    k[..., 5] *= 6  # an outlier channel
    v = rng.standard_normal((b, n, s, h)).astype(np.float32)
    pos = np.where(np.arange(s)[None, None] < np.asarray(lengths)[:, None, None], np.arange(s), -1)
    pos = np.broadcast_to(pos, (b, n, s)).astype(np.int32)
    return SlotKV(jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(pos), jnp.asarray(s, jnp.int32))


def _run(pol, c, rng, steps, dtype=jnp.float32, seed=0):
    """Ingest, then `steps` decode steps (crossing flushes); returns outputs and the final state."""
    st = _slots(np.random.default_rng(seed), dtype=dtype)
    state = pol._ingest(st, c, None, own=True)
    step = jax.jit(lambda s_, q, k, v, p: pol.decode(s_, q, k, v, p, c))
    outs = []
    length = jnp.asarray([200, 131])
    for i in range(steps):
        q, k, v = (jnp.asarray(rng.standard_normal((2, 1, nh, 64)), jnp.float32).astype(dtype) for nh in (6, 2, 2))
        state, out = step(state, q, k, v, (length + i)[:, None])
        outs.append(np.asarray(out, np.float32))
    return np.concatenate(outs, axis=1), state


@pytest.mark.parametrize("bits,group", [(2, 64), (4, 64), (8, 64)])
def test_fragments_decode_matches_the_standard_layout(bits, group):
    """Same flush blocks (G >= 64), so the same tokens are quantized at every step."""
    spec = f"kivi:bits={bits},group={group},residual={max(64, group)}"
    frag, std = parse_policy(spec + ",layout=fragments"), parse_policy(spec + ",layout=standard")
    c = ctx()
    assert frag.fragments(c) and not std.fragments(c) and frag.block(c) == std.block(c) == group
    out_f, st_f = _run(frag, c, np.random.default_rng(1), steps=64)
    out_s, st_s = _run(std, c, np.random.default_rng(1), steps=64)
    assert isinstance(st_f.streams[0].data, mgpu.KiviFragments)
    np.testing.assert_array_equal(np.asarray(st_f.streams[0].count), np.asarray(st_s.streams[0].count))
    # the same codes; the scales are rounded to bf16 (f16 for 8-bit codes, as in the standard layout)
    rel = np.linalg.norm(out_f - out_s) / np.linalg.norm(out_s)
    assert rel < 2e-2, rel
    kf, vf, pf = dequantize_state(frag, st_f, c)
    ks, vs, ps = dequantize_state(std, st_s, c)
    np.testing.assert_array_equal(np.asarray(pf), np.asarray(ps))
    for got, want in ((kf, ks), (vf, vs)):  # bf16 scales: within a few bf16 ulps of the largest entry
        err = np.max(np.abs(np.asarray(got) - np.asarray(want)))
        assert err <= 1e-2 * np.max(np.abs(np.asarray(want))), err


def test_fragments_decode_equals_attention_over_its_dequantized_cache():
    pol = parse_policy("kivi:bits=2,group=32,residual=64,layout=fragments")
    c = ctx()
    state = pol._ingest(_slots(np.random.default_rng(3)), c, None, own=True)
    rng = np.random.default_rng(4)
    length = jnp.asarray([200, 131])

    @jax.jit
    def checked(state, q, k, v, qpos):
        appended = pol._append(pol._flush(state, c), k[:, 0], v[:, 0], qpos[:, 0])  # what decode does first
        kd, vd, pd = dequantize_state(pol, appended, c)
        expected = attention.attention_reference(q, kd, vd, qpos, pd).out
        state, out = pol.decode(state, q, k, v, qpos, c)
        return state, out, expected

    for i in range(64):  # crosses a flush of 64 tokens in both rows
        q, k, v = (jnp.asarray(rng.standard_normal((2, 1, nh, 64)), jnp.float32) for nh in (6, 2, 2))
        state, out, expected = checked(state, q, k, v, (length + i)[:, None])
        # the Hopper kernel computes in bf16 (query, dequantized keys, probabilities, output:
        # one bf16 rounding of a 0.7 output is 3e-3 already); elsewhere tf32 / float32 dots
        tol = tolerance(jnp.bfloat16 if _compat.backend_kind() == "mosaic_gpu" else jnp.float32)[0]
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=tol, atol=tol)
    np.testing.assert_array_equal(np.asarray(state.streams[0].count[:, 0]), [192, 128])  # one flush each


@pytest.mark.parametrize(
    "spec,match",
    [
        ("kivi:bits=3,layout=fragments", r"layout='fragments' cannot hold bits=3"),
        ("kivi:bits=2,v_bits=4,layout=fragments", r"v_bits=4: the fragment layout holds one width"),
        ("kivi:group=48,residual=96,layout=fragments", r"group=48: the fragment layout needs 16, 32, 64"),
        ("kivi:layout=tiles", r"layout='tiles' is not supported; expected 'auto', 'standard' or 'fragments'"),
    ],
)
def test_bad_layout_names_the_problem(spec, match):
    with pytest.raises(PolicyError, match=match):
        parse_policy(spec)


def test_fragments_need_a_head_dim_multiple_of_64():
    import dataclasses

    pol = parse_policy("kivi:group=16,residual=16,layout=fragments")
    cfg = dataclasses.replace(CFG, head_dim=32, hidden_size=192)
    with pytest.raises(PolicyError, match=r"head_dim=32: the fragment layout needs 64, 128, 192 or 256"):
        pol.validate(100, cfg)  # what generate calls before tracing
    with pytest.raises(PolicyError, match=r"head_dim=32: the fragment layout needs 64, 128, 192 or 256"):
        pol.block(LayerContext(0, cfg, "decode", True, 50, 16, None))


def test_auto_layout_is_standard_off_hopper():
    pol = parse_policy("kivi")
    assert pol.fragments(ctx()) == (_compat.backend_kind() == "mosaic_gpu")


@pytest.mark.skipif(_compat.backend_kind() != "mosaic_gpu", reason="needs a Hopper GPU (Mosaic GPU kernel)")
@pytest.mark.parametrize("bits,group,residual", [(2, 32, 64), (4, 64, 64), (2, 32, 128), (8, 32, 64), (8, 64, 64)])
def test_hopper_kernel_decode_matches_reference(bits, group, residual):
    """On the GPU: decode through the Mosaic GPU kernel ("pallas") equals the XLA reference over
    the same fragment-layout cache, within bf16 tolerance, across flushes; residual=128 at G=32
    is the policy's default, a window of 192 slots (the merge reads it in chunks)."""
    pol = parse_policy(f"kivi:bits={bits},group={group},residual={residual},layout=fragments")
    fused, _ = _run(pol, ctx(impl="pallas"), np.random.default_rng(5), steps=64, dtype=jnp.bfloat16)
    ref, _ = _run(pol, ctx(impl="reference"), np.random.default_rng(5), steps=64, dtype=jnp.bfloat16)
    rel = np.linalg.norm(fused - ref) / np.linalg.norm(ref)
    assert rel < 1.2e-2, rel
