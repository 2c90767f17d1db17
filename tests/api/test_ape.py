"""APE: one context at T = S = 1 is sequential encoding; k contexts at T = S = 1 are attention
with a block-diagonal context mask; T and S change the context group only; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY

import kvjax
from kvjax.ape import APEKV, ape_attend
from kvjax.attention_reference import MASK_VALUE, AttentionOutput
from kvjax.generation import decode
from kvjax.loaders import Model
from kvjax.models import init_params
from kvjax.models.forward import forward
from kvjax.policies import parse_policy
from kvjax.sampling import Sampler
from kvjax.state import LayerContext, SlotKV

PREFIX = "Read the notes.\n"
NOTES = ["Note one: the red box is under the stairs.", "Note two: Tom took it.", "Three: blue lid, 42."]
QUERY = "\nQ: where is the box?\nA:"


@pytest.fixture(scope="module")
def model(tiny_model):
    p = init_params(TINY, jax.random.key(1))
    p = jax.tree_util.tree_map(lambda x: x * 2.0 if x.ndim == 2 else x, p)
    return Model(TINY, p, tiny_model.tokenizer, jnp.float32, "tiny")


def test_one_context_at_t_s_one_is_sequential_encoding(model):
    got = kvjax.ape(model, [NOTES[0]], QUERY, prefix=PREFIX, temperature=1.0, scale=1.0, max_new_tokens=10, stop_ids=[])
    want = kvjax.generate(model, PREFIX + NOTES[0] + QUERY, max_new_tokens=10, stop_ids=[])
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.stats["positions_used"] == want.stats["prompt_tokens"] + 10
    # no prefix at all
    got = kvjax.ape(model, [NOTES[1]], QUERY, temperature=1.0, scale=1.0, max_new_tokens=10, stop_ids=[])
    want = kvjax.generate(model, NOTES[1] + QUERY, max_new_tokens=10, stop_ids=[])
    np.testing.assert_array_equal(got.tokens, want.tokens)


def _block_diagonal(segments: np.ndarray, query_segment: int):
    """An attention function (`attention_reference`'s signature) for one whole-sequence prefill
    into an empty cache (slot s holds token s): token t sees token s <= t when s is in the prefix
    (segment 0), in t's own segment, or t is in the query segment."""
    seg = jnp.asarray(segments)

    def attend(q, k, v, q_pos, k_pos, *, window=None, scale=None, want_mass=False):
        b, t, nq, h = q.shape
        n, s = k.shape[1], k.shape[2]
        sq = jnp.pad(seg, (0, max(0, t - seg.shape[0])), constant_values=-2)[:t]
        sk = jnp.pad(seg, (0, max(0, s - seg.shape[0])), constant_values=-3)[:s]
        ok = (sk[None] == 0) | (sk[None] == sq[:, None]) | (sq[:, None] == query_segment)
        ok = ok & (jnp.arange(s)[None] <= jnp.arange(t)[:, None])
        mask = ok[None, None] & (k_pos[:, :, None, :] >= 0) & (q_pos[:, None, :, None] >= 0)  # [B, N, T, S]
        qg = q.reshape(b, t, n, nq // n, h).astype(jnp.float32)
        logits = jnp.einsum("btngh,bnsh->bngts", qg, k.astype(jnp.float32)) * (h**-0.5 if scale is None else scale)
        logits = jnp.where(mask[:, :, None], logits, MASK_VALUE)
        p = jax.nn.softmax(logits, axis=-1) * mask[:, :, None]
        out = jnp.einsum("bngts,bnsh->btngh", p, v.astype(jnp.float32)).reshape(b, t, nq, h)
        return AttentionOutput(out.astype(q.dtype), jnp.zeros((b, t, nq), jnp.float32), None)

    return attend


def test_k_contexts_at_t_s_one_are_block_diagonal_attention(model):
    tok, cfg = model.tokenizer, model.config
    pre, notes, query = tok.encode(PREFIX), [tok.encode(x) for x in NOTES], tok.encode(QUERY)
    got = kvjax.ape(model, NOTES, QUERY, prefix=PREFIX, temperature=1.0, scale=1.0, max_new_tokens=8, stop_ids=[])
    # one flat sequence with APE's positions, prefilled under a block-diagonal context mask
    p, longest = len(pre), max(len(x) for x in notes)
    ids = pre + [t for x in notes for t in x] + query
    pos = list(range(p)) + [p + i for x in notes for i in range(len(x))] + [p + longest + i for i in range(len(query))]
    segs = [0] * p + [1 + j for j, x in enumerate(notes) for _ in x] + [len(notes) + 1] * len(query)
    width = 256
    toks = np.zeros((1, width), np.int32)
    toks[0, : len(ids)] = ids
    positions = np.full((1, width), -1, np.int32)
    positions[0, : len(ids)] = pos
    fn = _block_diagonal(np.asarray(segs), len(notes) + 1)
    dense = parse_policy("dense")
    state = dense.init_state(cfg, 1, width, 16, jnp.float32)
    ctx = LayerContext(0, cfg, "prefill", False, width, 16, fn)
    logits, state = forward(
        model.params, jnp.asarray(toks), jnp.asarray(positions), state, config=cfg, policy=dense, ctx=ctx,
        logits_at=jnp.asarray([len(ids) - 1]),
    )  # fmt: skip
    out, _, _ = decode(
        model.params, state, logits, jax.random.key(0), config=cfg, policy=dense, max_new_tokens=8,
        sampler=Sampler(), stop_ids=(), dtype=jnp.float32, implementation="reference",
    )  # fmt: skip
    np.testing.assert_array_equal(got.tokens, np.asarray(out))


def test_temperature_and_scale_act_on_the_context_group_only(model):
    a = kvjax.ape(model, NOTES, [QUERY, QUERY + " "], prefix=PREFIX, max_new_tokens=6, stop_ids=[])
    b = kvjax.ape(model, NOTES, [QUERY, QUERY + " "], prefix=PREFIX, temperature=1, scale=1, max_new_tokens=6)
    assert a.stats["temperature"] == 0.9 and b.stats["scale"] == 1.0
    assert a.tokens.shape == (2, 6) and a.stats["contexts"] == 3
    # a context group that sees nothing: T and S do not matter
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.float32)
    qp = jnp.asarray([[9], [9]])
    empty = SlotKV.empty(1, 2, 4, 8, jnp.float32)
    full = SlotKV(
        jnp.asarray(rng.normal(size=(1, 2, 4, 8)), jnp.float32),
        jnp.asarray(rng.normal(size=(1, 2, 4, 8)), jnp.float32),
        jnp.asarray(np.tile(np.arange(4), (1, 2, 1)), jnp.int32),
        jnp.asarray(4, jnp.int32),
    )
    rows = SlotKV(
        jnp.asarray(rng.normal(size=(2, 2, 4, 8)), jnp.float32),
        jnp.asarray(rng.normal(size=(2, 2, 4, 8)), jnp.float32),
        full.pos.repeat(2, 0) + 4,
        jnp.asarray(4, jnp.int32),
    )
    st = APEKV(full, empty, rows)
    x = ape_attend(q, qp, st, rows, 0.5, 3.0, window=None, implementation=None).out
    y = ape_attend(q, qp, st, rows, 1.0, 1.0, window=None, implementation=None).out
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    st = APEKV(empty, full, rows)  # only the context group and the rows: S shifts weight to the context
    lo = ape_attend(q, qp, st, rows, 1.0, 0.01, window=None, implementation=None).out
    hi = ape_attend(q, qp, st, rows, 1.0, 100.0, window=None, implementation=None).out
    assert not np.allclose(np.asarray(lo), np.asarray(hi))


@pytest.mark.parametrize("bad", [dict(temperature=0.0), dict(scale=-1.0), dict(temperature=float("nan"))])
def test_ape_refuses_non_positive_temperature_or_scale(model, bad):
    with pytest.raises(ValueError, match="must be a number > 0"):
        kvjax.ape(model, NOTES, QUERY, **bad)


def test_ape_bad_input(model):
    with pytest.raises(ValueError, match="exceed the model's max_position"):
        kvjax.ape(model, ["x" * 500], QUERY, max_new_tokens=16)
    # many passages longer than the model's positions together fit: positions are reused
    out = kvjax.ape(model, ["word " * 80] * 8, QUERY, max_new_tokens=4)  # 3200 tokens > max_position=512
    assert out.stats["context_tokens"] == 3200 and out.stats["positions_used"] < model.config.max_position
    with pytest.raises(TypeError, match="contexts="):
        kvjax.ape(model, "just one string", QUERY)
    with pytest.raises(ValueError, match="empty"):
        kvjax.ape(model, ["ok", ""], QUERY)


def test_ape_attention_matches_the_formula(rng):
    """ape_attend against numpy: context weight S * (sum_ctx e^(l/T))^T, split by softmax(l/T)."""
    n, g, h, t_, s_ = 2, 2, 8, 0.7, 1.6
    q = rng.normal(size=(1, 1, n * g, h))
    k = {name: rng.normal(size=(1, n, 5, h)) for name in ("pre", "ctx", "own")}
    v = {name: rng.normal(size=(1, n, 5, h)) for name in ("pre", "ctx", "own")}
    pos = {"pre": np.arange(5), "ctx": np.arange(5) + 5, "own": np.arange(5) + 10}
    slot = {x: SlotKV(jnp.asarray(k[x]), jnp.asarray(v[x]), jnp.asarray(pos[x][None, None].repeat(n, 1)), 5) for x in k}
    got = ape_attend(
        jnp.asarray(q), jnp.asarray([[14]]), APEKV(slot["pre"], slot["ctx"], slot["own"]), slot["own"], t_, s_,
        window=None, implementation=None,
    ).out  # fmt: skip
    for head in range(n * g):
        kv = head // g
        logit = {x: k[x][0, kv] @ q[0, 0, head] / np.sqrt(h) for x in k}
        w_ctx = s_ * np.sum(np.exp(logit["ctx"] / t_)) ** t_
        p_ctx = np.exp(logit["ctx"] / t_) / np.sum(np.exp(logit["ctx"] / t_))
        num = sum(np.exp(logit[x]) @ v[x][0, kv] for x in ("pre", "own")) + w_ctx * (p_ctx @ v["ctx"][0, kv])
        den = sum(np.sum(np.exp(logit[x])) for x in ("pre", "own")) + w_ctx
        np.testing.assert_allclose(np.asarray(got[0, 0, head]), num / den, atol=1e-5)
