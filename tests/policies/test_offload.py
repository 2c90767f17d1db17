"""Block offload for sessions (ReKV / InfLLM style): a top-k covering every block decodes as
dense, a new turn retrieves the blocks an independent numpy re-implementation picks and
attends over [sinks | retrieved | window | question], chunked prefill, bad input."""

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


@pytest.mark.parametrize("chunk", [None, 64])
def test_topk_covering_every_block_equals_dense(chunk, tiny_params, tiny_config):
    cfg = tiny_config
    tokens, lengths = _context(cfg)
    question = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 16)), jnp.int32)
    want = _session(tiny_params, cfg, parse_policy("dense"), tokens, lengths, question)
    got = _session(tiny_params, cfg, Offload(window=32, block=64, topk=4, sinks=4), tokens, lengths, question, chunk)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[1], want[1])
    # question inside the prompt (kvjax.generate): the prompt's last block stands for the question
    kw = dict(config=cfg, max_new_tokens=8)
    lg_d, st_d = prefill(tiny_params, tokens, lengths, policy=parse_policy("dense"), **kw)
    pol = Offload(window=32, block=64, topk=4)
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


def _rekv(k, v, qq, kq, vq, length, cfg, *, window, block, topk, sinks):
    """The policy's turn on one row, re-implemented: k, v [N, L, H] (post-RoPE) the context; a
    question's queries qq [T, Nq, H], keys kq, values vq [T, N, H] at positions L..L+T-1.
    Returns (retrieved block ids, attention output [T, Nq, H])."""
    n, _, h = k.shape
    t, nq, _ = qq.shape
    g = nq // n
    win_start = max(0, (length - window) // block * block)
    sink_end = min(sinks, win_start)
    blocks = [j for j in range(length // block) if (j + 1) * block <= win_start and (j + 1) * block > sink_end]
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
    pol = Offload(window=100, block=32, topk=3, sinks=8)
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
    assert layer.nbytes_host_read_per_step() == 0 and layer.nbytes_host_read_per_turn() > 0


def test_bad_input(tiny_params, tiny_config):
    tokens, lengths = _context(tiny_config)
    with pytest.raises(
        PolicyError,
        match="prefill chunk of 32 tokens must divide the prompt bucket \\(256\\) and be a multiple of block=64",
    ):
        prefill(tiny_params, tokens, lengths, config=tiny_config, policy=Offload(), max_new_tokens=4, prefill_chunk=32)
    with pytest.raises(PolicyError, match="block=48 must divide the prompt bucket 256"):
        Offload(block=48).init_state(tiny_config, 1, 256, 4)
    for bad, msg in ((dict(window=0), "window=0"), (dict(topk=0), "topk=0"), (dict(offload="disk"), "offload='disk'")):
        with pytest.raises(PolicyError, match=msg):
            Offload(**bad)
