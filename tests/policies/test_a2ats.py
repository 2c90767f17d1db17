"""A^2ATS (vector-quantized key retrieval): codes are the query-aware argmin, lookup-table
scores are the windowed-RoPE logits, the decode step attends exactly over the retrieved set,
a full top-k is dense decoding, and missing or foreign calibrations name the command to run."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import teacher_forced_logits
from helpers import tiny_config as make_config

from kvjax import attention
from kvjax.generation import prefill
from kvjax.policies import A2ATS, Dense, PolicyError, parse_policy
from kvjax.policies.a2ats import CodedKV, approx_scores, encode, recall_at, rotate
from kvjax.quant import calibration
from kvjax.quant.calibration import CalibrationError
from kvjax.state import LayerContext


def _chol(rng, n, h):
    a = rng.standard_normal((n, h, h))
    return np.linalg.cholesky(a @ np.swapaxes(a, 1, 2) + h * np.eye(h)).astype(np.float32)


def test_codes_are_the_query_aware_argmin(rng):
    """Brute force over all C^M codewords in the original key space: the code minimises
    (k - k^)^T H (k - k^) with H = L L^T and k^ = L^-T c'."""
    n, h, m, c = 2, 6, 2, 4
    chol = _chol(rng, n, h)
    book = rng.standard_normal((n, m, c, h // m)).astype(np.float32)
    keys = rng.standard_normal((1, n, 20, h)).astype(np.float32) * 2
    codes = np.asarray(encode(jnp.asarray(keys), jnp.asarray(chol), jnp.asarray(book)))
    for ni in range(n):
        hess = chol[ni].astype(np.float64) @ chol[ni].T
        words = {combo: np.linalg.solve(chol[ni].T, np.concatenate([book[ni, i, j] for i, j in enumerate(combo)]))
                 for combo in itertools.product(range(c), repeat=m)}  # fmt: skip
        for s in range(keys.shape[2]):
            k = keys[0, ni, s].astype(np.float64)
            err = {combo: (k - w) @ hess @ (k - w) for combo, w in words.items()}
            assert tuple(codes[0, ni, s]) == min(err, key=err.get)


def test_lookup_scores_are_the_windowed_logits_of_the_coded_keys(rng):
    """With one codeword per key (the codebook is the keys themselves, in L-space) the codes are
    exact, and the lookup-table score of a key that sits w tokens before the query equals its
    true post-RoPE logit; other keys are scored as if they sat w back (windowed RoPE)."""
    cfg = make_config(head_dim=16, num_kv_heads=1, num_heads=2)
    n, g, h, s, w, m_pos = 1, 2, 16, 40, 7, 30
    chol = _chol(rng, n, h)
    k_pre = rng.standard_normal((1, n, s, h)).astype(np.float32)
    book = np.einsum("nhd,nsh->nsd", chol, k_pre[0])[:, None]  # M = 1 sub-vector, C = S codewords
    codes = encode(jnp.asarray(k_pre), jnp.asarray(chol), jnp.asarray(book))
    np.testing.assert_array_equal(np.asarray(codes)[0, 0, :, 0], np.arange(s))
    q_pre = rng.standard_normal((1, n, g, h)).astype(np.float32)
    q_post = rotate(jnp.asarray(q_pre), jnp.full((1, n, g), m_pos), cfg)
    q_tilde = rotate(q_post, jnp.full((1, n, g), w - m_pos), cfg)  # what the decode step computes
    linv = np.linalg.inv(chol.astype(np.float64)).astype(np.float32)
    approx = np.asarray(approx_scores(q_tilde, jnp.asarray(linv), jnp.asarray(book), codes))[0, 0]  # [G, S]
    k_post = np.asarray(rotate(jnp.asarray(k_pre), jnp.broadcast_to(jnp.arange(s), (1, n, s)), cfg))[0, 0]
    exact = np.asarray(q_post)[0, 0] @ k_post.T
    np.testing.assert_allclose(approx[:, m_pos - w], exact[:, m_pos - w], rtol=1e-4, atol=1e-4)
    as_if_w_back = np.einsum(
        "gh,sh->gs", np.asarray(rotate(jnp.asarray(q_pre), jnp.full((1, n, g), w), cfg))[0, 0], k_pre[0, 0]
    )
    np.testing.assert_allclose(approx, as_if_w_back, rtol=1e-4, atol=1e-4)


def _prefilled(cfg, pol, rng, b=2, t=96, max_new=4):
    n, g, h = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = f(b, t, n * g, h), f(b, t, n, h), f(b, t, n, h)
    lengths = np.array([t, t - 17])
    q_pos = jnp.asarray(np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1), jnp.int32)
    ctx = LayerContext(1, cfg, "prefill", True, t, max_new)
    st, _ = jax.jit(functools.partial(pol.prefill, ctx=ctx))(
        pol.init_layer(1, b, t, max_new, cfg, jnp.float32), q, k, v, q_pos
    )
    return st, lengths


def test_decode_step_attends_exactly_over_topk_union_window_and_sinks(tiny_config, tiny_calibrations, rng):
    cfg = tiny_config
    pol = A2ATS(topk=0.1, window=8, sinks=2, calibration=tiny_calibrations["a2ats"])
    st, lengths = _prefilled(cfg, pol, rng)
    assert isinstance(st, CodedKV) and st.rank == 10 and st.width == 3 * 10 + 8 + 2
    b, n, g, h = 2, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q1, k1, v1 = f(b, 1, n * g, h), f(b, 1, n, h), f(b, 1, n, h)
    p1 = jnp.asarray(lengths[:, None], jnp.int32)
    ctx = LayerContext(1, cfg, "decode", True, 0, 4)
    st1, out = jax.jit(functools.partial(pol.decode, ctx=ctx))(st, q1, k1, v1, p1)
    # independent selection from the same approximate scores
    chol, linv, book, w = pol.codec(ctx)
    qt = rotate(q1[:, 0].reshape(b, n, g, h), jnp.broadcast_to(w - p1[:, :, None], (b, n, g)), cfg)
    scores = np.asarray(approx_scores(qt, linv, book, st1.codes))
    pos = np.asarray(st1.kv.pos)
    sel = np.zeros(pos.shape, bool)
    for bi in range(b):
        qp = lengths[bi]
        seen = (pos[bi] >= 0) & (pos[bi] <= qp)
        always = seen & ((pos[bi] > qp - 8) | (pos[bi] < 2))
        k = int(np.ceil(0.1 * seen.sum(1).max()))
        for ni in range(n):
            sel[bi, ni] |= always[ni]
            for gi in range(g):
                s = np.where(seen[ni] & ~always[ni], scores[bi, ni, gi], -np.inf)
                sel[bi, ni, np.argsort(-s, kind="stable")[:k]] = True
    ref = attention.attention_reference(q1, st1.kv.k, st1.kv.v, p1, np.where(sel, pos, -1)).out
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # its code was written where the token went
    np.testing.assert_array_equal(
        st1.codes[:, :, 96], encode(rotate(jnp.swapaxes(k1, 1, 2), jnp.broadcast_to(p1[:, None], (b, n, 1)), cfg, inverse=True), chol, book)[:, :, 0]
    )  # fmt: skip


def test_full_topk_is_dense_decoding(tiny_config, tiny_params, tiny_calibrations, rng):
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, (2, 96)), jnp.int32)
    lengths = jnp.asarray([96, 61], jnp.int32)
    pol = A2ATS(topk=1.0, calibration=tiny_calibrations["a2ats"])
    dense, _ = teacher_forced_logits(tiny_params, tiny_config, Dense(), tokens, lengths, 12)
    a2, _ = teacher_forced_logits(tiny_params, tiny_config, pol, tokens, lengths, 12)
    np.testing.assert_allclose(a2, dense, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a2.argmax(-1), dense.argmax(-1))


def test_bytes_read_and_held(tiny_config, tiny_params, tiny_calibrations, rng):
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, (1, 256)), jnp.int32)
    pol = A2ATS(topk=0.03, window=16, sinks=4, calibration=tiny_calibrations["a2ats"])
    _, state = prefill(tiny_params, tokens, jnp.asarray([256]), config=tiny_config, policy=pol, max_new_tokens=4)
    layer = state.layers[0]
    n, h, m = tiny_config.num_kv_heads, tiny_config.head_dim, layer.codes.shape[3]
    slot = 2 * h * 4 + 4
    assert layer.rank == 8 and layer.width == 3 * 8 + 16 + 4  # ceil(0.03 * 260)
    assert layer.nbytes_read_per_step() == n * 260 * (m + 4) + 4 + n * layer.width * slot
    assert state.kv_bytes_held == 3 * (n * 260 * (slot + m) + 4)
    assert state.kv_bytes_read_per_step < 0.35 * state.kv_bytes_held


def test_snapkv_then_a2ats_and_refused_order(tiny_config, tiny_params, tiny_calibrations, rng):
    path = tiny_calibrations["a2ats"]
    pol = parse_policy(f"snapkv:budget=0.5,window=8+a2ats:topk=0.1,calibration={path}")
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, (1, 128)), jnp.int32)
    _, state = prefill(tiny_params, tokens, jnp.asarray([128]), config=tiny_config, policy=pol, max_new_tokens=4)
    assert all(isinstance(x, CodedKV) and x.kv.capacity == 68 for x in state.layers)
    with pytest.raises(PolicyError, match=r"cannot compose 'a2ats' before 'kivi'.*a coded cache"):
        parse_policy(f"a2ats:calibration={path}+kivi")


def test_missing_or_foreign_calibration_names_the_command(tiny_config, tiny_params, tiny_calibrations, tmp_path):
    tokens, lengths = jnp.ones((1, 32), jnp.int32), jnp.asarray([32])
    missing = A2ATS(calibration=str(tmp_path / "nothing"))
    with pytest.raises(CalibrationError, match=r"no a2ats calibration .*kvjax calibrate --method a2ats"):
        prefill(tiny_params, tokens, lengths, config=tiny_config, policy=missing, max_new_tokens=2)
    other = make_config(num_layers=2)
    with pytest.raises(
        CalibrationError, match=r"made for another model \(model='tiny'.*kvjax calibrate --method a2ats"
    ):
        A2ATS(calibration=tiny_calibrations["a2ats"]).validate(32, other)
    kvquant = tiny_calibrations["kvquant"]
    with pytest.raises(CalibrationError, match=r"is for method 'kvquant', not 'a2ats'"):
        A2ATS(calibration=kvquant).validate(32, tiny_config)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(topk=0.0), r"topk=0.0 must be a fraction"),
        (dict(topk=1.5), r"topk=1.5 must be a fraction"),
        (dict(window=-1), r"window=-1 must be an integer >= 0"),
        (dict(sinks=-2), r"sinks=-2 must be an integer >= 0"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        A2ATS(**kwargs)


def test_calibrator_query_aware_and_plain(tiny_config, tiny_params):
    """The fit: L is the Cholesky factor of the windowed query covariance (plain: identity);
    codebooks have head_dim / sub_dim sub-vectors of 2**bits centroids; k-means lowers the
    distortion of its start."""
    import types

    model = types.SimpleNamespace(config=tiny_config, params=tiny_params)
    stats = calibration.collect(model, np.random.default_rng(1).integers(0, 97, 64), queries=True)
    aware = calibration.a2ats_fit(stats, tiny_config, window=16, sub_dim=8, bits=3)
    plain = calibration.a2ats_fit(stats, tiny_config, window=16, sub_dim=8, bits=3, query_aware=False)
    assert aware["codebook"].shape == (3, 2, 4, 8, 8) and aware["chol"].shape == (3, 2, 32, 32)
    np.testing.assert_array_equal(plain["chol"], np.broadcast_to(np.eye(32), (3, 2, 32, 32)))
    qw = np.asarray(rotate(jnp.swapaxes(jnp.asarray(stats["q_pre"][0]), 0, 1), jnp.full((6, 64), 16), tiny_config))
    cov = np.einsum("gth,gtd->hd", qw[:3], qw[:3]) / (3 * 64)
    ll = aware["chol"][0, 0] @ aware["chol"][0, 0].T
    np.testing.assert_allclose(ll, cov, rtol=2e-3, atol=2e-3 * np.abs(cov).max())
    x = np.random.default_rng(0).standard_normal((2, 200, 3)).astype(np.float32)
    cent = calibration.kmeans(x, 8, iters=10)
    start = calibration.kmeans(x, 8, iters=0)
    dist = lambda c: np.mean(np.min(((x[:, :, None] - c[:, None]) ** 2).sum(-1), axis=-1))
    assert cent.shape == (2, 8, 3) and dist(cent) < dist(start)
    with pytest.raises(ValueError, match=r"sub_dim=5 must divide head_dim=32"):
        calibration.a2ats_fit(stats, tiny_config, sub_dim=5)
    with pytest.raises(ValueError, match=r"collect\(model, tokens, queries=True\)"):
        calibration.a2ats_fit({"k_pre": stats["k_pre"]}, tiny_config)


def test_prefill_state_layout(tiny_config, tiny_calibrations, rng):
    pol = A2ATS(calibration=tiny_calibrations["a2ats"])
    st, _ = _prefilled(tiny_config, pol, rng)
    assert st.codes.dtype == jnp.uint8 and st.codes.shape == (2, 2, 100, 4)
    assert np.all(np.asarray(st.kv.pos)[1, :, 79:96] == -1)
    assert jax.tree_util.tree_structure(st) == jax.tree_util.tree_structure(
        pol.init_layer(1, 2, 96, 4, tiny_config, jnp.float32).replace(kv=st.kv)
    )


@pytest.mark.slow
def test_shipped_smollm2_calibration_retrieves_on_held_out_text(smollm2):
    """The shipped artifact (GPL-3 text) on a pydoc window it has not seen: the approximate top-3%
    holds several times the exact top-3% keys a random 3% would (BENCHMARKS.md, Retrieval, has
    every layer)."""
    from kvjax.eval import load_text

    cfg = smollm2.config
    arrays = A2ATS().arrays(cfg)
    assert arrays["codebook"].shape == (30, 3, 8, 64, 8) and int(arrays["rope_window"][0]) == 1024
    ids = calibration._first_tokens(smollm2.tokenizer, load_text("pydoc"), 1024)
    stats = calibration.collect(smollm2, ids, queries=True)
    for layer in (4, 8):
        q = np.asarray(
            rotate(
                jnp.swapaxes(jnp.asarray(stats["q_pre"][layer][-4:]), 0, 1),
                jnp.broadcast_to(1020 + jnp.arange(4), (9, 4)),
                cfg,
            )
        )
        r = recall_at(
            np.swapaxes(q, 0, 1), stats["k_post"][layer], arrays["chol"][layer], arrays["codebook"][layer], 1024, cfg
        )
        assert r > 0.2, (layer, r)  # a random 3% recalls 0.03
