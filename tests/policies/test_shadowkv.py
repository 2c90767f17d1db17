"""ShadowKV (Sun et al. 2024): exactness at full rank and budget, the paper's landmark, outlier and
selection math against an independent numpy re-implementation, chunked prefill into the
offloaded store, the low-rank store, and bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import teacher_forced_logits

from kvjax import lowrank
from kvjax.generation import decode, prefill
from kvjax.policies import PolicyError, parse_policy
from kvjax.policies.shadowkv import ShadowKV, ShadowKVState
from kvjax.sampling import Sampler
from kvjax.state import LayerContext


def _tokens(cfg, lengths=(128, 101), t=128, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, cfg.vocab_size, (len(lengths), t)), jnp.int32), jnp.asarray(lengths, jnp.int32)


@pytest.mark.parametrize("prefill_chunk", [None, 16])
def test_full_rank_and_budget_decode_exactly_as_dense(prefill_chunk, tiny_params, tiny_config):
    """rank = N*H and a budget covering every chunk: logits within 1e-5 (float32) of the dense
    cache's at every teacher-forced step, the same greedy tokens; with a chunked prefill too
    (the prompt's K/V go through host memory chunk by chunk)."""
    cfg = tiny_config
    tokens, lengths = _tokens(cfg, (64, 45), t=64)
    full = ShadowKV(rank=cfg.num_kv_heads * cfg.head_dim, budget=1.0)
    dense, _ = teacher_forced_logits(tiny_params, cfg, parse_policy("dense"), tokens, lengths, 3)
    if prefill_chunk:  # teacher_forced_logits prefills whole; check the chunked prefill's logits and tokens
        kw = dict(config=cfg, max_new_tokens=8)
        lg_d, st_d = prefill(tiny_params, tokens, lengths, policy=parse_policy("dense"), **kw)
        lg_s, st_s = prefill(tiny_params, tokens, lengths, policy=full, prefill_chunk=prefill_chunk, **kw)
        np.testing.assert_allclose(np.asarray(lg_s), np.asarray(lg_d), atol=1e-5, rtol=0)
        dk = dict(config=cfg, max_new_tokens=8, sampler=Sampler(), stop_ids=())
        out_d = decode(tiny_params, st_d, lg_d, jax.random.key(0), policy=parse_policy("dense"), **dk)[0]
        out_s = decode(tiny_params, st_s, lg_s, jax.random.key(0), policy=full, **dk)[0]
        np.testing.assert_array_equal(np.asarray(out_s), np.asarray(out_d))
        return
    got, state = teacher_forced_logits(tiny_params, cfg, full, tokens, lengths, 3)
    assert isinstance(state.layers[0], ShadowKVState)
    np.testing.assert_allclose(got, dense, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), dense.argmax(-1))


@pytest.mark.parametrize("question", ["dense", "sparse"])
def test_a_new_turns_question_reads_every_chunk_unless_sparse(question, tiny_params, tiny_config):
    """At full rank (exact keys) and a one-chunk budget, a step with ctx.new_turn (a question
    `Session.ask` appends) under question="dense" attends over every prompt token: the dense
    cache's output; under "sparse" (and for answer steps) it reads one chunk and differs."""
    cfg = tiny_config
    tokens, lengths = _tokens(cfg, (64, 45), t=64)
    pol = ShadowKV(rank=cfg.num_kv_heads * cfg.head_dim, budget=8, outliers=0.0, local=1, question=question)
    kw = dict(config=cfg, max_new_tokens=4)
    _, st_d = prefill(tiny_params, tokens, lengths, policy=parse_policy("dense"), **kw)
    _, st_s = prefill(tiny_params, tokens, lengths, policy=pol, **kw)
    b, n, g, h = 2, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    rng = np.random.default_rng(1)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v, pos = f(b, 1, n * g, h), f(b, 1, n, h), f(b, 1, n, h), lengths[:, None]
    turn = LayerContext(1, cfg, "decode", True, 0, 4, new_turn=True)
    _, want = parse_policy("dense").decode(st_d.layers[1], q, k, v, pos, turn)
    _, got = pol.decode(st_s.layers[1], q, k, v, pos, turn)
    _, answer = pol.decode(st_s.layers[1], q, k, v, pos, LayerContext(1, cfg, "decode", True, 0, 4))
    assert not np.allclose(answer, want, atol=1e-3)
    np.testing.assert_allclose(got, want if question == "dense" else answer, atol=1e-5, rtol=0)


def test_chunked_prefill_builds_the_same_state(tiny_params, tiny_config):
    """A prompt prefilled in chunks of 32 (K/V written to host memory, read back chunk by chunk)
    leaves the state a whole-prompt prefill leaves."""
    tokens, lengths = _tokens(tiny_config, (128, 77))
    pol = ShadowKV(rank=24, budget=40, outliers=0.4)
    kw = dict(config=tiny_config, policy=pol, max_new_tokens=4)
    _, whole = prefill(tiny_params, tokens, lengths, **kw)
    _, chunked = prefill(tiny_params, tokens, lengths, prefill_chunk=32, **kw)
    for a, b in zip(whole.layers, chunked.layers):
        for name in ("cand", "limit"):
            np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
        np.testing.assert_array_equal(np.asarray(a.local.pos), np.asarray(b.local.pos))
        np.testing.assert_array_equal(np.asarray(a.outl.pos), np.asarray(b.outl.pos))
        np.testing.assert_allclose(np.asarray(a.landmarks), np.asarray(b.landmarks), atol=1e-5)
        np.testing.assert_allclose(np.asarray(a.v), np.asarray(b.v), atol=1e-6)
        rows = jnp.broadcast_to(jnp.arange(96)[None, None], (2, tiny_config.num_kv_heads, 96))
        np.testing.assert_allclose(np.asarray(a.keys.rebuild(rows)), np.asarray(b.keys.rebuild(rows)), atol=1e-4)


# ---- the paper's algorithm, re-implemented in numpy --------------------------------------------------


def _rope(x, pos, theta):
    """Rotate-half RoPE of x [..., T, H] at positions pos [T] (numpy, float64)."""
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
    return x * cos + rot * sin


def _paper(k_pre, v, q_new, k_new, v_new, length, cfg, *, rank, budget, chunk=8, local=4, outliers):
    """ShadowKV on one row, as the paper's prefill and decode step describe it: k_pre, v [N, L, H]
    (pre-RoPE keys), one new query q_new [Nq, H] with its key and value at position L. Returns
    (landmarks [N, C, H], outlier chunk sets, candidate sets, selected chunk sets, attention
    output [Nq, H])."""
    n, _, h = k_pre.shape
    g = q_new.shape[0] // n
    pos = np.arange(length)
    k_post = _rope(k_pre, pos, cfg.rope_theta)
    # truncated SVD of the pre-RoPE keys, heads side by side: [L, N*H]
    x = np.transpose(k_pre, (1, 0, 2)).reshape(length, n * h)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    x_r = (u[:, :rank] * s[:rank]) @ vt[:rank]
    k_lowrank = np.transpose(x_r.reshape(length, n, h), (1, 0, 2))
    chunks = length // chunk - local
    ctx = k_post[:, : chunks * chunk].reshape(n, chunks, chunk, h)
    landmarks = ctx.mean(axis=2)
    cos = np.einsum("ncth,nch->nct", ctx, landmarks) / np.maximum(
        np.linalg.norm(ctx, axis=-1) * np.linalg.norm(landmarks, axis=-1)[..., None], 1e-8
    )
    select = math.ceil(budget / chunk)
    n_out = math.ceil(select * outliers)
    out_sets = [set(np.argsort(cos.min(-1)[i], kind="stable")[:n_out].tolist()) for i in range(n)]
    cand = [sorted(set(range(chunks)) - out_sets[i]) for i in range(n)]
    chosen, out = [], np.zeros_like(q_new)
    for i in range(n):
        qg = q_new[i * g : (i + 1) * g]  # [G, H]
        lm = landmarks[i, cand[i]]
        logit = qg @ lm.T / np.sqrt(h)
        p = np.exp(logit - logit.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        score = p.max(0)  # max over the GQA group
        top = [cand[i][j] for j in np.argsort(-score, kind="stable")[:select]]
        chosen.append(set(top))
        rows_sel = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in sorted(top)])
        rows_out = np.concatenate([np.arange(c * chunk, (c + 1) * chunk) for c in sorted(out_sets[i])])
        rows_loc = np.arange(chunks * chunk, length)
        keys = np.concatenate(
            [
                _rope(k_lowrank[i, rows_sel], rows_sel, cfg.rope_theta),  # rebuilt, re-rotated
                k_post[i, rows_out],
                k_post[i, rows_loc],
                k_new[i][None],
            ]
        )
        vals = np.concatenate([v[i, rows_sel], v[i, rows_out], v[i, rows_loc], v_new[i][None]])
        att = qg @ keys.T / np.sqrt(h)
        w = np.exp(att - att.max(-1, keepdims=True))
        out[i * g : (i + 1) * g] = (w / w.sum(-1, keepdims=True)) @ vals
    return landmarks, out_sets, [set(c) for c in cand], chosen, out


def test_landmarks_outliers_selection_and_attention_equal_the_papers_algorithm(tiny_config):
    cfg = tiny_config
    n, h, nq = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    b, t, lengths = 2, 128, (128, 101)
    rng = np.random.default_rng(7)
    k_pre = rng.normal(size=(b, n, t, h)) * np.linspace(0.2, 2.0, h)  # uneven channels: a low-rank-ish key
    v = rng.normal(size=(b, n, t, h))
    q = rng.normal(size=(b, t, nq, h))
    pos = np.where(np.arange(t)[None] < np.array(lengths)[:, None], np.arange(t)[None], -1)
    k_post = np.stack([_rope(k_pre[i], np.arange(t), cfg.rope_theta) for i in range(b)])
    k_post = np.where((pos >= 0)[:, None, :, None], k_post, 0.0)
    pol = ShadowKV(rank=24, budget=40, outliers=0.4)  # 5 selected chunks, 2 outliers
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    ctx = LayerContext(0, cfg, "prefill", True, t, 4)
    st = pol.init_layer(0, b, t, 4, cfg, jnp.float32)
    run = jax.jit(lambda st, q, k, v, p: pol.prefill(st, q, k, v, p, ctx)[0])
    st = run(st, f32(q), f32(np.swapaxes(k_post, 1, 2)), f32(np.swapaxes(v, 1, 2)), jnp.asarray(pos))
    q1, k1, v1 = rng.normal(size=(b, 1, nq, h)), rng.normal(size=(b, 1, n, h)), rng.normal(size=(b, 1, n, h))
    p1 = jnp.asarray(np.array(lengths)[:, None], jnp.int32)
    ids, valid = jax.jit(pol.select)(st, f32(q1))
    step = jax.jit(lambda st, q, k, v, p: pol.decode(st, q, k, v, p, LayerContext(0, cfg, "decode", True, 0, 4))[1])
    out = step(st, f32(q1), f32(k1), f32(v1), p1)
    for r, length in enumerate(lengths):
        lm, outl, cand, chosen, want = _paper(
            k_pre[r, :, :length], v[r, :, :length], q1[r, 0], k1[r, 0], v1[r, 0], length, cfg,
            rank=24, budget=40, outliers=0.4,
        )  # fmt: skip
        chunks = lm.shape[1]
        np.testing.assert_allclose(np.asarray(st.landmarks[r, :, :chunks]), lm, atol=1e-5)
        for i in range(n):
            have_cand = set(np.flatnonzero(np.asarray(st.cand[r, i])).tolist())
            assert have_cand == cand[i]
            opos = np.asarray(st.outl.pos[r, i])
            assert {int(p) // 8 for p in opos[opos >= 0]} == outl[i]
            sel = np.asarray(ids[r, i])[np.asarray(valid[r, i])]
            assert set(sel.tolist()) == chosen[i]
        np.testing.assert_allclose(np.asarray(out[r, 0]), want, atol=2e-5, rtol=1e-5)


def test_fit_basis_equals_numpy_svd_and_counts_energy(rng):
    x = rng.normal(size=(1, 2, 50, 8)) * np.linspace(0.1, 3.0, 8)
    valid = np.arange(50)[None] < 43
    basis, w = lowrank.fit_basis(lowrank.gram(jnp.asarray(x, jnp.float32), jnp.asarray(valid)), 5)
    flat = np.swapaxes(x, 1, 2).reshape(1, 50, 16)[0, :43]
    _, s, vt = np.linalg.svd(flat, full_matrices=False)
    np.testing.assert_allclose(
        np.abs(np.asarray(basis[0]) @ vt[:5].T), np.eye(5), atol=1e-4
    )  # same vectors, up to sign
    np.testing.assert_allclose(np.asarray(w[0]), s**2, rtol=1e-4, atol=1e-5 * s[0] ** 2)
    e = lowrank.energy_captured(w[0], [5, 16])
    assert e[1] == pytest.approx(1.0) and e[0] == pytest.approx(float((s[:5] ** 2).sum() / (s**2).sum()), rel=1e-5)
    store, _ = lowrank.fit_store(jnp.asarray(x, jnp.float32), jnp.asarray(valid), 16)
    rows = jnp.broadcast_to(jnp.arange(43)[None, None], (1, 2, 43))
    np.testing.assert_allclose(np.asarray(store.rebuild(rows)), x[:, :, :43], atol=1e-4)  # full rank: exact


def test_state_bytes_and_reads(tiny_params, tiny_config):
    tokens, lengths = _tokens(tiny_config, (128, 128))
    pol = ShadowKV(rank=16, budget=32)
    _, st = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=4)
    _, dense = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=parse_policy("dense"), max_new_tokens=4)
    layer = st.layers[0]
    n, h = tiny_config.num_kv_heads, tiny_config.head_dim
    assert layer.nbytes_host() == 2 * n * 128 * h * 4  # every prompt value, float32
    assert layer.nbytes_host_read_per_step() == 2 * n * 4 * 8 * h * 4  # 4 chunks of 8 values per (row, head)
    assert (
        st.device_bytes < 0.7 * dense.kv_bytes_held and st.kv_bytes_read_per_step < 0.5 * dense.kv_bytes_read_per_step
    )


def test_bad_input(tiny_params, tiny_config):
    cfg = tiny_config
    with pytest.raises(PolicyError, match="rank=65 exceeds the key channels N\\*H = 2\\*32 = 64"):
        ShadowKV(rank=65).init_state(cfg, 1, 64, 4)
    with pytest.raises(PolicyError, match="chunk=12 must divide the prompt bucket 64"):
        ShadowKV(chunk=12).init_state(cfg, 1, 64, 4)
    tokens, lengths = _tokens(cfg, (128,))
    with pytest.raises(PolicyError, match="prefill chunk of 20 tokens must divide the prompt bucket \\(120\\)"):
        prefill(
            tiny_params, tokens[:, :120], lengths - 8, config=cfg, policy=ShadowKV(), max_new_tokens=4, prefill_chunk=20
        )
    for bad, msg in (
        (dict(budget=0), "budget=0 must be"),
        (dict(budget=12.5), "must be a whole number"),
        (dict(outliers=1.5), "outliers=1.5 must be a fraction"),
        (dict(offload="disk"), "offload='disk'; expected one of"),
        (dict(rank=-1), "rank=-1 must be an integer >= 0"),
        (dict(question="all"), r"question='all'; expected one of \('dense', 'sparse'\)"),
    ):
        with pytest.raises(PolicyError, match=msg):
            ShadowKV(**bad)
    assert ShadowKV().key_rank(cfg) == 16  # the paper's 160/1024 of 64 channels, a multiple of 8
