"""Quantized caches (kvjax.quant) on a tiny random model: decode equals attention over the
dequantized cache, the residual window is exact, bytes shrink, composition with eviction,
fused-kernel dispatch, and bad input. Every registered quantizer is picked up."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_QUANT

from kvjax import attention
from kvjax.generation import decode, prefill
from kvjax.models.forward import init_params
from kvjax.policies import REGISTRY, parse_policy
from kvjax.policies.base import PolicyError
from kvjax.policies.compose import Compose
from kvjax.quant import QuantPolicy, calibration, dequantize_state, register_quantized_kernel
from kvjax.quant.attention import _KERNELS, kivi_decode_attention_reference
from kvjax.quant.base import QuantState
from kvjax.sampling import Sampler
from kvjax.state import LayerContext, SlotKV

CFG = TINY_QUANT
QUANT = sorted(n for n, c in REGISTRY.items() if issubclass(c, QuantPolicy))
CALIBRATED = tuple(n for n in QUANT if "calibration" in REGISTRY[n].parameters())  # kvquant, rotatekv, ...
# small-shape settings per method (group / residual / gap sized for a 32-dim, ~50-token test)
SMALL = {
    "kivi": "group=16,residual=16",
    "cskv": "window=16,group=16",
    "zipcache": "stream_gap=8",
    "rotatekv": "sinks=2",
    "kvquant": "outliers=0.05",
}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(np.random.randint(2**31)))


@pytest.fixture(scope="module")
def calib(params, tmp_path_factory):
    """Calibrate every calibrated method on random tokens of the tiny model."""
    model = types.SimpleNamespace(config=CFG, params=params)
    stats = calibration.collect(model, np.random.randint(0, CFG.vocab_size, 96), grads=True)
    root = tmp_path_factory.mktemp("calib")
    return {m: calibration.save(str(root / m), m, CFG, calibration.CALIBRATORS[m](stats, CFG)) for m in CALIBRATED}


@pytest.fixture(scope="module")
def calib_rand(tmp_path_factory):
    """Calibrations fitted to the random test distribution (what `collect` would measure)."""
    from kvjax.quant.base import rope_heads

    st = random_slots(s=200, lengths=(200, 200))
    k = jnp.concatenate([st.k, st.k[:, :, ::-1]], axis=0)[:, None]  # [2, 1, N, S, H] -> layers
    k = jnp.concatenate([k[0], k[1]], axis=0)  # [L=2, N, S, H]
    pos = jnp.broadcast_to(jnp.arange(200), k.shape[:3])
    t = lambda x: np.asarray(jnp.swapaxes(x, 1, 2))
    stats = {"k_post": t(k), "k_pre": t(rope_heads(k, pos, CFG, inverse=True)), "v": t(k[:, ::-1] * 0.5)}
    stats["gk_pre"] = np.ones_like(stats["k_pre"])
    stats["gv"] = np.ones_like(stats["v"])
    root = tmp_path_factory.mktemp("calib_rand")
    return {m: calibration.save(str(root / m), m, CFG, calibration.CALIBRATORS[m](stats, CFG)) for m in CALIBRATED}


def make(name, calib, bits=None, extra=""):
    args = [a for a in (SMALL.get(name, ""), extra) if a]
    if bits:
        args.append(f"bits={bits}")
    if name in CALIBRATED:
        args.append(f"calibration={calib[name]}")
    return parse_policy(f"{name}:{','.join(args)}")


def random_slots(b=2, n=2, s=50, h=32, lengths=(50, 37), seed=None):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((b, n, s, h)).astype(np.float32)
    k[..., 3] *= 8  # an outlier channel
    v = rng.standard_normal((b, n, s, h)).astype(np.float32)
    pos = np.where(np.arange(s)[None, None] < np.asarray(lengths)[:, None, None], np.arange(s), -1)
    pos = np.broadcast_to(pos, (b, n, s)).astype(np.int32)
    return SlotKV(jnp.asarray(k), jnp.asarray(v), jnp.asarray(pos), jnp.asarray(s, jnp.int32))


def ctx(phase="decode", new=16, impl=None):
    return LayerContext(0, CFG, phase, True, 50, new, impl)


def _ingest(pol, st, c):
    scores = jnp.asarray(np.random.default_rng().random(st.pos.shape), jnp.float32)
    return pol._ingest(st, c, scores, own=True)


def _checked_step(pol, c):
    """jit: one decode step and the reference over the dequantized cache it attends to."""

    def step(state, q, k, v, qpos):
        appended = pol._append(pol._flush(state, c), k[:, 0], v[:, 0], qpos[:, 0])  # what decode does first
        kd, vd, pd = dequantize_state(pol, appended, c)
        expected = attention.attention_reference(q, kd, vd, qpos, pd).out
        state, out = pol.decode(state, q, k, v, qpos, c)
        return state, out, expected

    return jax.jit(step)


@pytest.mark.parametrize("name", QUANT)
def test_decode_equals_attention_over_dequantized_cache(name, calib):
    pol = make(name, calib)
    c = ctx()
    state = jax.jit(lambda st, sc: pol._ingest(st, c, sc, own=True))(
        random_slots(), jnp.asarray(np.random.default_rng().random((2, 2, 50)), jnp.float32)
    )
    step = _checked_step(pol, c)
    rng = np.random.default_rng()
    length = jnp.asarray([50, 37])
    for i in range(10):  # crosses several flushes (block 16 / 8 / 1)
        q = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((2, 1, 2, 32)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((2, 1, 2, 32)), jnp.float32)
        state, out, expected = step(state, q, k, v, (length + i)[:, None])
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=2e-5, atol=2e-5)
    # every token seen is still held exactly once
    _, _, pd = dequantize_state(pol, state, c)
    p = np.asarray(pd[0, 0])
    if pol.needs_positions:
        np.testing.assert_array_equal(np.sort(p[p >= 0]), np.arange(60))
    else:
        assert int((p >= 0).sum()) == 60  # post-RoPE streams store no positions


@pytest.mark.parametrize(
    "name,bits,tol",
    [
        ("kivi", 4, 0.15),
        ("kivi", 2, 0.6),
        ("rtn", 4, 0.2),
        ("rtn", 8, 0.02),
        ("kvquant", 4, 0.2),
        ("kvquant", 2, 0.7),
        ("rotatekv", 4, 0.2),
        ("rotatekv", 2, 0.7),
        ("bfp", 4, 0.25),
        ("kv4", 4, 0.15),
        ("zipcache", 2, 0.6),
        ("zipcache", 4, 0.15),
    ],
)
def test_dequantized_cache_close_to_original(name, bits, tol, calib_rand):
    pol = make(name, calib_rand, bits)
    st = random_slots()
    kd, vd, pd = dequantize_state(pol, _ingest(pol, st, ctx()), ctx())
    for b, n in [(0, 0), (1, 1)]:
        for orig, deq in ((st.k, kd), (st.v, vd)):
            p = np.asarray(pd[b, n])
            keep = p >= 0
            o = np.asarray(orig[b, n])[p[keep]] if pol.needs_positions else np.asarray(orig[b, n])[: keep.sum()]
            if not pol.needs_positions and name == "zipcache":
                continue  # ZipCache reorders tokens by saliency (order is irrelevant to attention)
            rel = np.linalg.norm(np.asarray(deq[b, n])[keep] - o) / np.linalg.norm(o)
            assert rel < tol, (name, bits, rel)


def test_residual_window_last_tokens_exact():
    pol = parse_policy("kivi:bits=2,group=16,residual=32")
    st = random_slots(s=100, lengths=(100, 71))
    c = ctx(new=40)
    state = pol.ingest(st, c)
    step = jax.jit(lambda s_, q, k, v, p: pol.decode(s_, q, k, v, p, c))
    rng = np.random.default_rng()
    for i in range(40):
        k = jnp.asarray(rng.standard_normal((2, 1, 2, 32)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((2, 1, 2, 32)), jnp.float32)
        q = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), jnp.float32)
        qpos = jnp.asarray([[100 + i], [71 + i]])
        state, _ = step(state, q, k, v, qpos)
        for b in range(2):
            rl = int(state.res_len[b, 0])
            assert 32 <= rl <= 48  # R <= residual <= R + G (a full window is flushed next step): the last R are exact
            rp = np.asarray(state.res_pos[b, 0, :rl])
            np.testing.assert_array_equal(rp, np.arange(int(qpos[b, 0]) - rl + 1, int(qpos[b, 0]) + 1))
            np.testing.assert_array_equal(np.asarray(state.res_k[b, 0, rl - 1]), np.asarray(k[b, 0, 0]))
            np.testing.assert_array_equal(np.asarray(state.res_v[b, 0, rl - 1]), np.asarray(v[b, 0, 0]))
    total = np.asarray(state.streams[0].count + state.res_len)
    np.testing.assert_array_equal(total[:, 0], [140, 111])
    # prompt tokens still in the window are the original ones, bit for bit
    state0 = pol.ingest(st, c)
    rl = int(state0.res_len[0, 0])
    np.testing.assert_array_equal(np.asarray(state0.res_k[0, 0, :rl]), np.asarray(st.k[0, 0, 100 - rl :]))


@pytest.mark.slow
@pytest.mark.parametrize("name", QUANT)
def test_generate_end_to_end_and_bytes(name, params, calib):
    """Jitted prefill + while_loop decode through the model; the quantized state is
    smaller than the dense one; 8-bit caches (where offered) track the dense logits."""
    pol = make(name, calib)
    tokens = jnp.asarray(np.random.randint(0, 128, (2, 64)), jnp.int32)
    lengths = jnp.asarray([64, 45])
    common = dict(config=CFG, max_new_tokens=24)
    logits, st = prefill(params, tokens, lengths, policy=pol, **common)
    d_logits, d_st = prefill(params, tokens, lengths, policy=parse_policy("dense"), **common)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(d_logits), rtol=1e-4, atol=1e-4)  # prefill is exact
    assert all(isinstance(layer, QuantState) for layer in st.layers)
    out, n_out, st2 = decode(
        params, st, logits, jax.random.key(0), policy=pol, sampler=Sampler(), stop_ids=(), **common
    )
    assert out.shape == (2, 24) and np.all(np.asarray(n_out) == 24)
    assert st2.nbytes == st.nbytes  # static shapes
    assert st.nbytes < d_st.nbytes, (name, st.nbytes, d_st.nbytes)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["kivi", "rtn"])
def test_eight_bit_decode_tracks_dense(name, params, calib):
    pol = make(name, calib, 8)
    tokens = jnp.asarray(np.random.randint(0, 128, (1, 64)), jnp.int32)
    lengths = jnp.asarray([64])
    res = {}
    for p in (pol, parse_policy("dense")):
        logits, st = prefill(params, tokens, lengths, policy=p, config=CFG, max_new_tokens=20)
        from kvjax.eval.ppl import _teacher_forced_nll

        tgt = jnp.asarray(np.random.default_rng(0).integers(0, 128, (1, 20)), jnp.int32)
        res[p.name] = float(_teacher_forced_nll(params, st, logits, tgt, config=CFG, policy=p, dtype=jnp.float32)[0])
    assert abs(res[name] - res["dense"]) < 1e-2 * abs(res["dense"])


def _selectors():
    """Prompt-eviction policies that exist now (SnapKV first); Dense when none does."""
    names = [n for n in ("snapkv", "pyramidkv", "knorm") if n in REGISTRY]
    return names[:1] or ["dense"]


@pytest.mark.parametrize("selector", _selectors())
def test_composition_with_eviction_saves_both(selector, params):
    q = "kivi:bits=2,group=16,residual=16"
    comp = parse_policy(f"{selector}:budget=0.25+{q}" if selector != "dense" else f"dense+{q}")
    assert isinstance(comp, Compose)
    tokens = jnp.asarray(np.random.randint(0, 128, (2, 128)), jnp.int32)
    lengths = jnp.asarray([128, 100])
    sizes = {}
    for label, pol in (("comp", comp), ("quant", parse_policy(q)), ("select", comp.policies[0])):
        logits, st = prefill(params, tokens, lengths, policy=pol, config=CFG, max_new_tokens=8)
        _out, _, _st2 = decode(
            params,
            st,
            logits,
            jax.random.key(0),
            policy=pol,
            sampler=Sampler(),
            stop_ids=(),
            config=CFG,
            max_new_tokens=8,
        )
        assert np.all(np.isfinite(np.asarray(logits)))
        sizes[label] = st.nbytes
    if selector != "dense":
        assert sizes["comp"] < sizes["quant"] and sizes["comp"] < sizes["select"], sizes


def test_ingest_handles_per_head_positions():
    """Evicted slots: different kept tokens per head, kept slots first, -1 after."""
    st = random_slots(s=40, lengths=(40, 40))
    pos = np.asarray(st.pos).copy()
    pos[0, 1, 25:] = -1  # head 1 of row 0 kept 25 tokens
    pos[0, 0] = np.concatenate(
        [
            np.arange(0, 80, 2),
        ]
    )[:40]  # head 0 holds even positions
    st = st.replace(pos=jnp.asarray(pos))
    pol = parse_policy("kivi:bits=4,group=16,residual=16")
    state = pol.ingest(st, ctx())
    np.testing.assert_array_equal(np.asarray(state.streams[0].count[0] + state.res_len[0]), [40, 25])
    np.testing.assert_array_equal(
        np.asarray(state.res_pos[0, 0, : int(state.res_len[0, 0])]), pos[0, 0, int(state.streams[0].count[0, 0]) : 40]
    )


def test_fused_kernel_plugs_in_behind_dispatch(calib):
    calls = []

    def fake_kernel(*args, **kw):
        calls.append(kw["bits"])
        return kivi_decode_attention_reference(*args, **kw)

    register_quantized_kernel("fake_quant_kernel", fake_kernel)
    try:
        pol = make("kivi", calib, 4)
        state = _ingest(pol, random_slots(), ctx())
        rng = np.random.default_rng()
        q = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((2, 1, 2, 32)), jnp.float32)
        qpos = jnp.asarray([[50], [37]])
        _, ref = pol.decode(state, q, k, k, qpos, ctx())
        _, fused = pol.decode(state, q, k, k, qpos, ctx(impl="fake_quant_kernel"))
        assert calls == [4]
        np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), rtol=1e-5, atol=1e-5)
    finally:
        _KERNELS.pop("fake_quant_kernel", None)


# ---- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec,match",
    [
        ("kivi:bits=5", r"kivi: bits=5 is not supported; expected one of \(2, 3, 4, 8\)"),
        ("kivi:bits=3,group=16", r"kivi: group=16 must be a positive multiple of 32"),
        ("kivi:group=32,residual=48", r"kivi: residual=48 must be a non-negative multiple of group=32"),
        ("rtn:bits=1", r"rtn: bits=1 is not supported"),
        ("kvquant:bits=8", r"kvquant: bits=8 is not supported; expected one of \(2, 3, 4\)"),
        ("zipcache:high_bits=5", r"zipcache: high_bits=5 is not supported"),
        ("zipcache:salient=1.5", r"zipcache: salient=1.5 must be a fraction"),
        ("rotatekv:clip=0", r"rotatekv: clip=0.0 must be in \(0, 1\]"),
        ("bfp:bits=7", r"bfp: bits=7 is not supported"),
    ],
)
def test_bad_parameters(spec, match):
    with pytest.raises(PolicyError, match=match):
        parse_policy(spec)


def test_group_must_divide_head_dim(calib):
    big = dataclasses.replace(CFG, head_dim=48, name="odd")
    with pytest.raises(PolicyError, match=r"kivi: group=32 must divide head_dim=48"):
        parse_policy("kivi").init_state(big, 1, 64, 8)
    with pytest.raises(PolicyError, match=r"bfp: group=32 must divide head_dim=48"):
        parse_policy("bfp:block_size=32,reorder=false").init_state(big, 1, 64, 8)
    with pytest.raises(PolicyError, match=r"rotatekv: head_group=2 must divide num_kv_heads=3"):
        parse_policy(f"rotatekv:head_group=2,calibration={calib['rotatekv']}").init_state(
            dataclasses.replace(CFG, num_kv_heads=3, num_heads=6), 1, 64, 8
        )


def test_grouped_head_rotation_refused_after_eviction(calib):
    pol = make("rotatekv", calib, extra="head_group=2")
    state = _ingest(pol, random_slots(), ctx())  # standalone: all heads share tokens
    assert isinstance(state, QuantState)
    with pytest.raises(PolicyError, match=r"head_group=2 rotates heads together"):
        pol.ingest(random_slots(), ctx())


def test_calibration_for_another_model_is_refused(calib, tmp_path):
    other = dataclasses.replace(CFG, name="other-model", num_layers=3)
    with pytest.raises(
        calibration.CalibrationError,
        match=r"made for another model \(model='tiny-quant', num_layers=2.*this model has "
        r"model='other-model', num_layers=3",
    ):
        calibration.load("kvquant", other, calib["kvquant"])
    with pytest.raises(PolicyError, match="was made for another model"):
        parse_policy(f"kv4:calibration={calib['kv4']}").init_state(other, 1, 64, 8)
    with pytest.raises(calibration.CalibrationError, match=r"is for method 'bfp', not 'kv4'"):
        calibration.load("kv4", CFG, calib["bfp"])
    with pytest.raises(
        calibration.CalibrationError,
        match=r"no kvquant calibration for model 'tiny-quant' at .*"
        r"run `kvjax calibrate --method kvquant",
    ):
        calibration.load("kvquant", CFG, str(tmp_path / "missing"))
    with pytest.raises(calibration.CalibrationError, match="cannot read a calibration artifact"):
        calibration.load("kvquant", CFG, str(tmp_path))


def test_decode_before_prefill_is_an_error():
    pol = parse_policy("kivi")
    z = jnp.zeros((1, 1, 4, 32))
    with pytest.raises(PolicyError, match="decode needs the quantized state"):
        pol.decode(
            SlotKV.empty(1, 2, 8, 32, jnp.float32), z, z[:, :, :2], z[:, :, :2], jnp.zeros((1, 1), jnp.int32), ctx()
        )


def test_pallas_adapter_matches_reference(calib):
    """implementation='pallas' routes KIVI decode through pallas_kernels' quantized decode
    attention (its XLA path on CPU) with the residual padded to a power of two."""
    pol = make("kivi", calib, 4)
    state = _ingest(pol, random_slots(), ctx())
    rng = np.random.default_rng()
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 32)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 1, 2, 32)), jnp.float32)
    qpos = jnp.asarray([[50], [37]])
    _, ref = pol.decode(state, q, k, k, qpos, ctx())
    _, out = pol.decode(state, q, k, k, qpos, ctx(impl="pallas"))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4)
    from kvjax.quant.attention import pallas_kivi_attention

    d, st = state.streams[0].data, pol._append(state, k[:, 0], k[:, 0], qpos[:, 0])
    direct = pallas_kivi_attention(
        q,
        d.k_codes,
        d.k_scale,
        d.k_zero,
        d.v_codes,
        d.v_scale,
        d.v_zero,
        st.streams[0].count,
        st.res_k,
        st.res_v,
        st.res_len,
        bits=4,
        group=16,
    )
    assert direct is not None  # the kernel module took it (no silent fallback)
    np.testing.assert_allclose(np.asarray(direct), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", QUANT)
def test_dense_bytes_reference_is_the_model_dtype(name, params, calib):
    """A quantized state's dense reference (`dense_nbytes`, the compression ratio's
    denominator) is a dense cache of the model's K/V dtype, as the dense state's own, not
    of its scales' lower precision (float32 model: the ratio was off by 2x)."""
    tokens = jnp.asarray(np.random.randint(0, 128, (2, 64)), jnp.int32)
    lengths = jnp.asarray([64, 45])
    common = dict(config=CFG, max_new_tokens=8, dtype=jnp.float32)
    _, st = prefill(params, tokens, lengths, policy=make(name, calib), **common)
    _, d_st = prefill(params, tokens, lengths, policy=parse_policy("dense"), **common)
    assert st.dense_nbytes(CFG) == d_st.dense_nbytes(CFG) == (64 + 45) * CFG.kv_bytes_per_token(4)  # tokens seen
