"""Block offload for sessions (ReKV / InfLLM style): a top-k covering every block decodes as
dense (each question / selection mode), a new turn retrieves the blocks an independent numpy
re-implementation picks (ReKV's cosine rule with a sparse question; the question's attention
mass per KV head with a dense question) and attends over the right segments, chunked prefill,
bytes, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generation import decode, prefill
from kvjax.generation.resume import feed
from kvjax.policies import PolicyError, parse_policy
from kvjax.policies.offload import Offload, OffloadKV
from kvjax.sampling import Sampler
from kvjax.state import LayerContext

NEW = 24  # decode room: a question of 16 tokens and an answer


def _context(cfg, lengths=(256, 203), t=256, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, cfg.vocab_size, (len(lengths), t)), jnp.int32), jnp.asarray(lengths, jnp.int32)


def _session(params, cfg, pol, tokens, lengths, question, chunk=None):
    """Prefill the context (question excluded), append the question as a new turn, decode 6
    greedy tokens: (logits after the question [B, V], tokens [B, 8])."""
    logits, st = prefill(params, tokens, lengths, config=cfg, policy=pol, max_new_tokens=NEW, prefill_chunk=chunk)
    t = question.shape[1]
    pos = jnp.asarray(lengths)[:, None] + jnp.arange(t)[None]
    logits, st = feed(
        params, st, question, pos, jnp.full((tokens.shape[0],), t - 1, jnp.int32),
        config=cfg, policy=pol, dtype=jnp.float32, phase="decode", chunked=True, new_turn=True,
    )  # fmt: skip
    out = decode(params, st, logits, jax.random.key(0), config=cfg, policy=pol, max_new_tokens=8,
                 sampler=Sampler(), stop_ids=())[0]  # fmt: skip
    return np.asarray(logits), np.asarray(out)


MODES = [dict(), dict(select="cosine"), dict(question="sparse", select="cosine")]


@pytest.mark.parametrize("chunk,mode", [(None, MODES[0]), (64, MODES[0]), (None, MODES[1]), (64, MODES[2])])
def test_topk_covering_every_block_equals_dense(chunk, mode, tiny_params, tiny_config):
    cfg = tiny_config
    tokens, lengths = _context(cfg)
    question = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 16)), jnp.int32)
    want = _session(tiny_params, cfg, parse_policy("dense"), tokens, lengths, question)
    pol = Offload(window=32, block=64, topk=4, sinks=4, **mode)
    got = _session(tiny_params, cfg, pol, tokens, lengths, question, chunk)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[1], want[1])
    # question inside the prompt (kvjax.generate): the prompt's last block stands for the question
    kw = dict(config=cfg, max_new_tokens=8)
    lg_d, st_d = prefill(tiny_params, tokens, lengths, policy=parse_policy("dense"), **kw)
    pol = Offload(window=32, block=64, topk=4, **mode)
    lg_o, st_o = prefill(tiny_params, tokens, lengths, policy=pol, prefill_chunk=chunk, **kw)
    dk = dict(config=cfg, max_new_tokens=8, sampler=Sampler(), stop_ids=())
    np.testing.assert_array_equal(
        np.asarray(decode(tiny_params, st_o, lg_o, jax.random.key(0), policy=pol, **dk)[0]),
        np.asarray(decode(tiny_params, st_d, lg_d, jax.random.key(0), policy=parse_policy("dense"), **dk)[0]),
    )


def _rope(x, pos, theta):
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    return x * cos + np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1) * sin


def _retrievable(length, window, block, sinks):
    """(window start, sink end, blocks): a row of `length` tokens keeps its sinks and its device
    window (from a block boundary) on the device; the whole blocks between are retrievable."""
    win_start = max(0, (length - window) // block * block)
    sink_end = min(sinks, win_start)
    return win_start, sink_end, [j for j in range(length // block) if sink_end < (j + 1) * block <= win_start]


def _rekv(k, v, qq, kq, vq, length, cfg, *, window, block, topk, sinks):
    """The policy's turn on one row, re-implemented: k, v [N, L, H] (post-RoPE) the context; a
    question's queries qq [T, Nq, H], keys kq, values vq [T, N, H] at positions L..L+T-1.
    Returns (retrieved block ids, attention output [T, Nq, H])."""
    n, _, h = k.shape
    t, nq, _ = qq.shape
    g = nq // n
    win_start, sink_end, blocks = _retrievable(length, window, block, sinks)
    reps = {j: k[:, j * block : (j + 1) * block].mean(1).reshape(-1) for j in blocks}  # all heads' channels
    qmean = qq.reshape(t, n, g, h).mean(axis=(0, 2)).reshape(-1)
    cos = {j: r @ qmean / (np.linalg.norm(r) * np.linalg.norm(qmean)) for j, r in reps.items()}
    got = sorted(sorted(cos, key=lambda j: -cos[j])[:topk])
    ctx_pos = sorted(
        set(range(sink_end))
        | {p for j in got for p in range(j * block, (j + 1) * block)}
        | set(range(win_start, length))
    )
    keys = np.concatenate([k[:, ctx_pos], np.swapaxes(kq, 0, 1)], axis=1)  # [N, S, H]
    vals = np.concatenate([v[:, ctx_pos], np.swapaxes(vq, 0, 1)], axis=1)
    kpos = np.array(ctx_pos + list(range(length, length + t)))
    out = np.zeros_like(qq)
    for i in range(nq):
        att = qq[:, i] @ keys[i // g].T / np.sqrt(h)  # [T, S]
        att = np.where(kpos[None] <= length + np.arange(t)[:, None], att, -np.inf)
        w = np.exp(att - att.max(-1, keepdims=True))
        out[:, i] = (w / w.sum(-1, keepdims=True)) @ vals[i // g]
    return set(got), out


def _prefilled(pol, cfg, k, v, lengths, tq, rng):
    """The policy's decode state after a prompt of post-RoPE k, v [B, N, S, H] (the queries
    random), ready for tq + 2 new tokens."""
    b, _, t, h = k.shape
    pos = np.arange(t)
    valid = pos[None] < np.array(lengths)[:, None]
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    st = pol.init_layer(0, b, t, tq + 2, cfg, jnp.float32)
    ctx = LayerContext(0, cfg, "prefill", True, t, tq + 2)
    run = jax.jit(lambda s, q, kk, vv, p: pol.prefill(s, q, kk, vv, p, ctx)[0])
    kk = np.where(valid[:, None, :, None], k, 0.0)
    q = f32(rng.normal(size=(b, t, cfg.num_heads, h)))
    st = run(st, q, f32(np.swapaxes(kk, 1, 2)), f32(np.swapaxes(v, 1, 2)), jnp.asarray(np.where(valid, pos[None], -1)))
    assert isinstance(st, OffloadKV)
    return st


def test_a_new_turn_retrieves_by_cosine_similarity_and_attends_over_the_segments(tiny_config):
    cfg = tiny_config
    n, h, nq = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    b, t, lengths, tq = 2, 512, (512, 450), 5
    rng = np.random.default_rng(3)
    pos = np.arange(t)
    k = np.stack([_rope(rng.normal(size=(n, t, h)), pos, cfg.rope_theta) for _ in range(b)])
    v = rng.normal(size=(b, n, t, h))
    valid = pos[None] < np.array(lengths)[:, None]
    kpos = np.where(valid, pos[None], -1)
    pol = Offload(window=100, block=32, topk=3, sinks=8, question="sparse", select="cosine")
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    st = pol.init_layer(0, b, t, tq + 2, cfg, jnp.float32)
    ctx = LayerContext(0, cfg, "prefill", True, t, tq + 2)
    run = jax.jit(lambda s, q, kk, vv, p: pol.prefill(s, q, kk, vv, p, ctx)[0])
    kk = np.where(valid[:, None, :, None], k, 0.0)
    st = run(
        st,
        f32(rng.normal(size=(b, t, nq, h))),
        f32(np.swapaxes(kk, 1, 2)),
        f32(np.swapaxes(v, 1, 2)),
        jnp.asarray(kpos),
    )
    assert isinstance(st, OffloadKV)
    qq, kq, vq = rng.normal(size=(b, tq, nq, h)), rng.normal(size=(b, tq, n, h)), rng.normal(size=(b, tq, n, h))
    qpos = jnp.asarray(np.array(lengths)[:, None] + np.arange(tq)[None], jnp.int32)
    turn = LayerContext(0, cfg, "decode", True, 0, tq, new_turn=True)
    st2, out = jax.jit(lambda s, q, kk, vv, p: pol.decode(s, q, kk, vv, p, turn))(st, f32(qq), f32(kq), f32(vq), qpos)
    for r, length in enumerate(lengths):
        want_blocks, want = _rekv(k[r], v[r], qq[r], kq[r], vq[r], length, cfg, window=100, block=32, topk=3, sinks=8)
        gp = np.asarray(st2.got.pos[r, 0])
        assert {int(p) // 32 for p in gp[gp >= 0]} == want_blocks
        np.testing.assert_allclose(np.asarray(out[r]), want, atol=2e-5, rtol=1e-5)
    # a step that is not a new turn keeps the retrieved blocks
    step = LayerContext(0, cfg, "decode", True, 0, 1)
    st3, _ = jax.jit(lambda s, q, kk, vv, p: pol.decode(s, q, kk, vv, p, step))(
        st2, f32(qq[:, :1]), f32(kq[:, :1]), f32(vq[:, :1]), qpos[:, -1:] + 1
    )
    np.testing.assert_array_equal(np.asarray(st3.got.pos), np.asarray(st2.got.pos))


def _attention_mass_turn(k, v, qq, kq, vq, qa, ka, va, length, *, window, block, topk, sinks):
    """The policy's dense question and attention-mass retrieval on one row, re-implemented: k, v
    [N, L, H] (post-RoPE) the context; a question's queries qq [T, Nq, H], keys kq, values vq
    [T, N, H] at positions L..L+T-1; one answer token qa [Nq, H], ka, va [N, H] after it.
    Returns (per KV head: (block ids, score margin between the topk-th and the next), the
    question's output [T, Nq, H] (dense attention over the whole row), the answer's output
    [Nq, H] over sinks + its head's blocks + window + question + itself)."""
    n, _, h = k.shape
    t, nq, _ = qq.shape
    g = nq // n
    win_start, sink_end, blocks = _retrievable(length, window, block, sinks)
    keys = np.concatenate([k[:, :length], np.swapaxes(kq, 0, 1)], axis=1)  # [N, L + T, H]
    vals = np.concatenate([v[:, :length], np.swapaxes(vq, 0, 1)], axis=1)
    kpos = np.arange(length + t)
    out_q = np.zeros_like(qq)
    got, mass = {}, np.zeros((n, len(blocks)))
    for i in range(nq):
        att = qq[:, i] @ keys[i // g].T / np.sqrt(h)  # [T, L + T]
        att = np.where(kpos[None] <= length + np.arange(t)[:, None], att, -np.inf)
        p = np.exp(att - att.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out_q[:, i] = p @ vals[i // g]
        for c, j in enumerate(blocks):
            mass[i // g, c] += p[:, max(j * block, sink_end) : (j + 1) * block].sum()
    for m in range(n):
        order = np.argsort(-mass[m])
        got[m] = (sorted(blocks[c] for c in order[:topk]), mass[m, order[topk - 1]] - mass[m, order[topk]])
    out_a = np.zeros_like(qa)
    for i in range(nq):
        m = i // g
        ctx_pos = sorted(
            set(range(sink_end))
            | {p for j in got[m][0] for p in range(max(j * block, sink_end), (j + 1) * block)}
            | set(range(win_start, length))
        )
        kk = np.concatenate([k[m, ctx_pos], kq[:, m], ka[None, m]])
        vv = np.concatenate([v[m, ctx_pos], vq[:, m], va[None, m]])
        att = kk @ qa[i] / np.sqrt(h)
        w = np.exp(att - att.max())
        out_a[i] = (w / w.sum()) @ vv
    return got, out_q, out_a


def test_a_new_turn_retrieves_by_the_questions_attention_mass_per_kv_head(tiny_config):
    cfg = tiny_config
    n, h, nq = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    b, t, lengths, tq, blk = 2, 512, (512, 450), 5, 32
    rng = np.random.default_rng(4)
    pos = np.arange(t)
    k = np.stack([_rope(rng.normal(size=(n, t, h)), pos, cfg.rope_theta) for _ in range(b)])
    v = rng.normal(size=(b, n, t, h))
    qq, kq, vq = rng.normal(size=(b, tq, nq, h)), rng.normal(size=(b, tq, n, h)), rng.normal(size=(b, tq, n, h))
    # each KV head's group of question queries finds its own planted blocks (1, 4, 7 + head) at
    # different strengths, so each head's top 3 is clear and the heads choose differently
    planted = {m: [1 + m, 4 + m, 7 + m] for m in range(n)}
    for r in range(b):
        for m in range(n):
            qdir = qq[r, :, m * (nq // n) : (m + 1) * (nq // n)].mean(axis=(0, 1))
            for strength, j in zip((1.0, 0.8, 0.6), planted[m]):
                k[r, m, j * blk : (j + 1) * blk] += strength * qdir / np.linalg.norm(qdir) * np.sqrt(h)
    pol = Offload(window=100, block=blk, topk=3, sinks=8)
    assert (pol.question, pol.selection) == ("dense", "attention")
    st = _prefilled(pol, cfg, k, v, lengths, tq, rng)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    qpos = jnp.asarray(np.array(lengths)[:, None] + np.arange(tq)[None], jnp.int32)
    turn = LayerContext(0, cfg, "decode", True, 0, tq, new_turn=True)
    st2, out = jax.jit(lambda s, q, kk, vv, p: pol.decode(s, q, kk, vv, p, turn))(st, f32(qq), f32(kq), f32(vq), qpos)
    qa, ka, va = rng.normal(size=(b, 1, nq, h)), rng.normal(size=(b, 1, n, h)), rng.normal(size=(b, 1, n, h))
    step = LayerContext(0, cfg, "decode", True, 0, 1)
    st3, out_a = jax.jit(lambda s, q, kk, vv, p: pol.decode(s, q, kk, vv, p, step))(
        st2, f32(qa), f32(ka), f32(va), qpos[:, -1:] + 1
    )
    for r, length in enumerate(lengths):
        got, want_q, want_a = _attention_mass_turn(
            k[r], v[r], qq[r], kq[r], vq[r], qa[r, 0], ka[r, 0], va[r, 0], length,
            window=100, block=blk, topk=3, sinks=8,
        )  # fmt: skip
        for m in range(n):
            ids, margin = got[m]
            assert margin > 1e-2 and ids == planted[m]  # a clear choice: the planted blocks
            gp = np.asarray(st2.got.pos[r, m])
            assert sorted({int(p) // blk for p in gp[gp >= 0]}) == ids, (r, m)
        assert len({tuple(got[m][0]) for m in range(n)}) > 1  # the KV heads chose differently
        np.testing.assert_allclose(np.asarray(out[r]), want_q, atol=2e-5, rtol=1e-5)  # the question: dense
        np.testing.assert_allclose(np.asarray(out_a[r, 0]), want_a, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(st3.got.pos), np.asarray(st2.got.pos))


def test_state_layout_and_bytes(tiny_params, tiny_config):
    tokens, lengths = _context(tiny_config)
    pol = Offload(window=32, block=64, topk=2, sinks=4)
    _, st = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=8)
    layer = st.layers[0]
    # row 0: 256 tokens, window from 192 (256 - 32 floored to a block), sinks 0..3; row 1: 203 -> from 128
    pos = np.asarray(layer.local.pos)
    assert sorted(pos[0, 0][pos[0, 0] >= 0].tolist()) == [0, 1, 2, 3] + list(range(192, 256))
    assert sorted(pos[1, 0][pos[1, 0] >= 0].tolist()) == [0, 1, 2, 3] + list(range(128, 203))
    np.testing.assert_array_equal(np.asarray(layer.ok), [[True, True, True, False], [True, True, False, False]])
    assert layer.nbytes_host() == 2 * 2 * tiny_config.num_kv_heads * 256 * tiny_config.head_dim * 4
    assert layer.nbytes_host_read_per_step() == 0
    # a dense question reads every block (K and V) once more than the retrieved ones
    got = 2 * 2 * tiny_config.num_kv_heads * 2 * 64 * tiny_config.head_dim * 4
    assert layer.nbytes_host_read_per_turn() == got + 2 * 2 * tiny_config.num_kv_heads * 256 * tiny_config.head_dim * 4
    _, st = prefill(tiny_params, tokens, lengths, config=tiny_config, max_new_tokens=8,
                    policy=Offload(window=32, block=64, topk=2, sinks=4, question="sparse", select="cosine"))  # fmt: skip
    assert st.layers[0].nbytes_host_read_per_turn() == got


def test_bad_input(tiny_params, tiny_config):
    tokens, lengths = _context(tiny_config)
    with pytest.raises(
        PolicyError,
        match="prefill chunk of 32 tokens must divide the prompt bucket \\(256\\) and be a multiple of block=64",
    ):
        prefill(tiny_params, tokens, lengths, config=tiny_config, policy=Offload(), max_new_tokens=4, prefill_chunk=32)
    with pytest.raises(PolicyError, match="block=48 must divide the prompt bucket 256"):
        Offload(block=48).init_state(tiny_config, 1, 256, 4)
    for bad, msg in (
        (dict(window=0), "window=0"),
        (dict(topk=0), "topk=0"),
        (dict(offload="disk"), "offload='disk'"),
        (dict(question="all"), "question='all'"),
        (dict(select="dot"), "select='dot'"),
        (
            dict(question="sparse", select="attention"),
            "select='attention' .* needs question='dense' \\(got question='sparse'\\)",
        ),
    ):
        with pytest.raises(PolicyError, match=msg):
            Offload(**bad)
    assert Offload().selection == "attention" and Offload(question="sparse").selection == "cosine"
