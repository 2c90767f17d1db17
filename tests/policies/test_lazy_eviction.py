"""Lazy eviction (`kvjax.policies.eviction`): a decode step leaves its eviction (Elastic Cache:
its merge) pending and the next step or `maintain` applies it before anything reads the cache.
Attention must see exactly what the eager step (write, attend, evict at once) shows it, so the
eager step is kept here as the reference and both run on the same tensors: ragged rows, a padded
step, GQA (6 query heads over 2 KV heads), many evictions."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generation import decode, prefill
from kvjax.generation.resume import extend
from kvjax.policies import parse_policy, slots
from kvjax.policies.elastic_cache import ElasticCache, ElasticKV
from kvjax.policies.eviction import EvictingKV, ScoredKV
from kvjax.sampling import Sampler
from kvjax.state import LayerContext

SPECS = ("h2o:budget=0.25", "h2o:budget=0.25,normalize=True", "streaming:budget=0.25,sink=2", "tova:budget=0.25",
         "elastic:budget=0.25,sink=2,offset=3", "elastic:budget=0.25")  # fmt: skip


# ---- the eager decode steps (the implementation before lazy eviction), the reference -------------


def eager_evict_decode(pol, state, q, k, v, q_pos, ctx):
    """Write the token into the first empty slot, attend, then empty the lowest-ranked slot."""
    kv = state.kv
    free = jnp.argmin(jnp.where(kv.pos < 0, 0, 1), axis=2)
    kv = slots.write_slot(kv, free, k, v, q_pos)
    bi, ni = jnp.arange(kv.pos.shape[0])[:, None], jnp.arange(kv.pos.shape[1])[None]
    st = ScoredKV(kv, state.score.at[bi, ni, free].set(0.0), state.limit)
    res = pol.attend(kv, q, q_pos, ctx, want_mass=True)
    score = pol.decode_score(st, res, q_pos, ctx)
    newest = kv.pos == q_pos[:, :1, None]
    ranked = jnp.where((kv.pos < 0) | newest, jnp.inf, pol.eviction_rank(score, kv))
    victim = jnp.argmin(ranked, axis=2)
    full = jnp.sum(kv.pos >= 0, axis=2) > state.limit
    pos = kv.pos.at[bi, ni, victim].set(jnp.where(full, -1, kv.pos[bi, ni, victim]))
    return type(state).settled(kv.replace(pos=pos), score, state.limit), res.out


def eager_elastic_decode(pol, state, q, k, v, q_pos, ctx):
    """Write the token into the first empty slot, attend, then merge the truncated token."""
    kv = state.kv
    b, n, s = kv.pos.shape
    bi, ni = jnp.arange(b)[:, None], jnp.arange(n)[None]
    free = jnp.argmin(jnp.where(kv.pos < 0, 0, 1), axis=2)
    kv = slots.write_slot(kv, free, k, v, q_pos)
    weight = state.score.at[bi, ni, free].set(1.0)
    res = pol.attend(kv, q, q_pos, ctx)
    full = jnp.sum(kv.pos >= 0, axis=2) > state.limit
    victim = pol.truncation_slot(kv.pos, kv.pos == q_pos[:, :1, None])
    vpos = kv.pos[bi, ni, victim]
    dist = jnp.abs(kv.pos - vpos[..., None]).astype(jnp.float32) * 2 + (kv.pos > vpos[..., None])
    others = (kv.pos >= 0) & (jnp.arange(s)[None, None] != victim[..., None])
    anchor = jnp.argmin(jnp.where(others, dist, jnp.inf), axis=2)
    wv, wa = weight[bi, ni, victim], weight[bi, ni, anchor]
    tot = jnp.maximum(wv + wa, 1e-30)

    def mix(x):
        xa, xv = x[bi, ni, anchor].astype(jnp.float32), x[bi, ni, victim].astype(jnp.float32)
        new = (wa[..., None] * xa + wv[..., None] * xv) / tot[..., None]
        return x.at[bi, ni, anchor].set(jnp.where(full[..., None], new, xa).astype(x.dtype))

    weight = weight.at[bi, ni, anchor].set(jnp.where(full, wa + wv, wa))
    weight = weight.at[bi, ni, victim].set(jnp.where(full, 0.0, wv))
    pos = kv.pos.at[bi, ni, victim].set(jnp.where(full, -1, vpos))
    kv = kv.replace(k=mix(kv.k), v=mix(kv.v), pos=pos)
    return ElasticKV.settled(kv, weight, state.limit), res.out


def eager(pol):
    """The same policy (same parameters) decoding with the eager step; nothing is ever pending."""
    step = eager_elastic_decode if isinstance(pol, ElasticCache) else eager_evict_decode
    cls = type(pol)
    body = {"decode": step, "maintain": lambda self, state, ctx: state}
    eager_cls = dataclasses.dataclass(frozen=True)(type(f"Eager{cls.__name__}", (cls,), body))
    return eager_cls(**{f.name: getattr(pol, f.name) for f in dataclasses.fields(pol)})


# ---- helpers ------------------------------------------------------------------------------------


def _assert_same_state(lazy, ref):
    """Same kept tokens (positions exactly) and the same K, V and scores in them."""
    assert type(lazy) is type(ref)
    pos = np.asarray(lazy.kv.pos)
    np.testing.assert_array_equal(pos, np.asarray(ref.kv.pos))
    keep = pos >= 0
    for a, b in ((lazy.kv.k, ref.kv.k), (lazy.kv.v, ref.kv.v)):
        np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lazy.score)[keep], np.asarray(ref.score)[keep], rtol=1e-5, atol=1e-6)
    assert not np.asarray(lazy.pending).any()


def _prefilled(pol, cfg, rng, lengths, steps):
    """A compressed layer state of random post-RoPE q/k/v (rows of `lengths` tokens)."""
    b, t = len(lengths), max(lengths)
    nq, n, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = jnp.asarray(rng.normal(size=(b, t, nq, h)) * 2, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, n, h)) * 2, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    q_pos = jnp.asarray(np.where(np.arange(t)[None] < np.asarray(lengths)[:, None], np.arange(t)[None], -1))
    st = pol.init_layer(0, b, t, steps, cfg, jnp.float32)
    st, _ = pol.prefill(st, q, k, v, q_pos, LayerContext(0, cfg, "prefill", True, t, steps))
    return st


# ---- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", SPECS)
def test_lazy_decode_steps_match_the_eager_steps(spec, tiny_config, rng):
    """40 decode steps on one layer (two ragged rows, row 1 idle for a padded step): every step's
    attention output equals the eager step's, each step leaves an eviction pending, and
    `maintain` settles the state into the eager one (applying it twice = once)."""
    cfg, steps, lengths = tiny_config, 40, (44, 29)
    pol = parse_policy(spec)
    ref_pol = eager(pol)
    lazy = _prefilled(pol, cfg, rng, lengths, steps)
    ref = lazy  # prefill and compression are the same for both
    assert isinstance(lazy, EvictingKV) and not np.asarray(lazy.pending).any()
    ctx = LayerContext(0, cfg, "decode", True, 0, steps)
    lazy_step, ref_step = (
        jax.jit(lambda s, *a: pol.decode(s, *a, ctx)),
        jax.jit(lambda s, *a: ref_pol.decode(s, *a, ctx)),
    )
    nq, n, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    nxt, evictions = np.asarray(lengths), 0
    for i in range(steps):
        q = jnp.asarray(rng.normal(size=(2, 1, nq, h)) * 2, jnp.float32)
        k = jnp.asarray(rng.normal(size=(2, 1, n, h)) * 2, jnp.float32)
        v = jnp.asarray(rng.normal(size=(2, 1, n, h)), jnp.float32)
        pos = np.where([True, i != 7], nxt, -1)  # row 1 pads one step (position -1)
        lazy, out = lazy_step(lazy, q, k, v, jnp.asarray(pos[:, None], jnp.int32))
        ref, want = ref_step(ref, q, k, v, jnp.asarray(pos[:, None], jnp.int32))
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-6, atol=1e-6, err_msg=f"step {i}")
        evictions += int(np.asarray(lazy.pending).sum())
        nxt = nxt + (pos >= 0)
    assert evictions >= steps * n, f"{spec}: only {evictions} evictions in {steps} steps"
    settled = pol.maintain(lazy, ctx)
    _assert_same_state(settled, ref)
    again = pol.maintain(settled, ctx)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(settled)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _generate(params, cfg, pol, tokens, lengths, max_new):
    logits, state = prefill(params, tokens, lengths, config=cfg, policy=pol, max_new_tokens=max_new)
    out, _, state = decode(
        params, state, logits, jax.random.key(0), config=cfg, policy=pol, max_new_tokens=max_new,
        sampler=Sampler(), stop_ids=(),
    )  # fmt: skip
    return np.asarray(out), state


@pytest.mark.parametrize(
    "spec",
    ("h2o:budget=0.25", "streaming:budget=0.25,sink=2", "tova:budget=0.25", "elastic:budget=0.25,sink=2,offset=3"),
)
def test_generate_with_lazy_eviction_equals_eager(spec, tiny_config, tiny_params, rng):
    """Through `generate`'s compiled decode loop (3 layers, three ragged rows, 24 tokens, an
    eviction every step): the same tokens as the eager policy, and the state the loop returns
    (settled by `maintain` when it stops) is the eager one."""
    pol = parse_policy(spec)
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(3, 64)), jnp.int32)
    lengths = jnp.asarray([64, 53, 41], jnp.int32)
    out, state = _generate(tiny_params, tiny_config, pol, tokens, lengths, 24)
    want, ref = _generate(tiny_params, tiny_config, eager(pol), tokens, lengths, 24)
    np.testing.assert_array_equal(out, want)
    for a, b in zip(state.layers, ref.layers):
        _assert_same_state(a, b)


def test_extend_settles_the_pending_eviction(tiny_config, tiny_params, rng):
    """Decode steps outside the loop (`kvjax.generation.resume.extend`, what sessions append
    questions with) hand back a settled state: the eager one."""
    pol = parse_policy("h2o:budget=0.25")
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(2, 48)), jnp.int32)
    lengths = jnp.asarray([48, 37], jnp.int32)
    more = rng.integers(3, tiny_config.vocab_size, size=(2, 6))
    results = []
    for p in (pol, eager(pol)):
        _, state = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=p, max_new_tokens=8)
        results.append(extend(tiny_params, state, more, [6, 6], config=tiny_config, policy=p))
    np.testing.assert_allclose(np.asarray(results[0][0]), np.asarray(results[1][0]), rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1].layers, results[1][1].layers):
        _assert_same_state(a, b)
