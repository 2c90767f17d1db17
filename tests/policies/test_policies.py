"""Every registered policy, through the same checks (a new method gets them for free)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention
from kvjax.generation import decode, prefill
from kvjax.policies import REGISTRY, Policy, PolicyError, parse_policy
from kvjax.policies.eviction import EvictionPolicy, ScoredKV
from kvjax.sampling import Sampler
from kvjax.state import LayerContext, SlotKV

ALL = sorted(REGISTRY)
EVICTION = sorted(n for n, c in REGISTRY.items() if issubclass(c, EvictionPolicy))


def make(name, calibrations=None, **kw):
    cls = REGISTRY[name]
    fields = cls.parameters()
    if "budget" in fields:
        kw.setdefault("budget", 0.25)
    if "window" in fields:
        kw.setdefault("window", 4)
    if "calibration" in fields and calibrations is not None:
        kw.setdefault("calibration", calibrations[name])
    return cls(**kw)


def _run(params, cfg, policy, tokens, lengths, max_new=6):
    logits, state = prefill(params, tokens, lengths, config=cfg, policy=policy, max_new_tokens=max_new)
    out, _n, state2 = decode(
        params,
        jax.tree.map(jnp.copy, state),  # decode donates its input; the tests read `state` after
        logits,
        jax.random.key(0),
        config=cfg,
        policy=policy,
        max_new_tokens=max_new,
        sampler=Sampler(),
        stop_ids=(),
    )
    return logits, state, out, state2


def _prompts(rng, cfg, b=3, t=64):
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(b, t)), jnp.int32)
    lengths = jnp.asarray([t, t - 11, t - 23][:b], jnp.int32)
    return tokens, lengths


@pytest.mark.parametrize("name", ALL)
def test_generate_runs_finite_and_spec_roundtrips(name, tiny_config, tiny_params, tiny_calibrations, rng):
    pol = make(name, tiny_calibrations)
    assert parse_policy(pol.spec()) == pol
    tokens, lengths = _prompts(rng, tiny_config)
    logits, _state, out, state2 = _run(tiny_params, tiny_config, pol, tokens, lengths)
    assert np.all(np.isfinite(np.asarray(logits)))
    assert out.shape == (3, 6) and np.all((np.asarray(out) >= 0) & (np.asarray(out) < tiny_config.vocab_size))
    np.testing.assert_array_equal(np.asarray(state2.lengths), np.asarray(lengths) + 5)


@pytest.mark.parametrize("name", EVICTION)
def test_compressed_state_is_smaller_and_within_budget(name, tiny_config, tiny_params, rng):
    pol = make(name, budget=0.25)
    tokens, lengths = _prompts(rng, tiny_config)
    _, state, _, _ = _run(tiny_params, tiny_config, pol, tokens, lengths, max_new=2)
    dense = parse_policy("dense")
    _, dstate, _, _ = _run(tiny_params, tiny_config, dense, tokens, lengths, max_new=2)
    assert state.nbytes < 0.5 * dstate.nbytes, (state.nbytes, dstate.nbytes)
    for layer in state.layers:
        pos = np.asarray(layer.kv.pos if isinstance(layer, ScoredKV) else layer.pos)
        if pos.ndim == 2:  # pooled per-head storage (AdaKV): per-layer total
            kept = (pos >= 0).sum(1)
            limit = np.floor(np.asarray(lengths) * 0.25 + 1e-4) * tiny_config.num_kv_heads
        else:
            kept = (pos >= 0).sum(2).max(1)
            limit = np.maximum(np.floor(np.asarray(lengths) * 0.25 + 1e-4), getattr(pol, "sink", 0) + 1)
            if name == "pyramidkv":
                limit = np.full_like(limit, pos.shape[2])
        assert np.all(kept <= limit), (kept, limit)


def _layer_ctx(cfg, t, max_new, phase="prefill"):
    return LayerContext(0, cfg, phase, True, t, max_new)


@pytest.mark.parametrize("name", EVICTION)
def test_decode_after_compression_equals_attention_over_kept(name, tiny_config, rng):
    """Reference semantics of eviction: the decode step attends to exactly the kept slots
    (plus the new token) as a dense cache holding only those would."""
    if name == "adakv":
        pytest.skip("adakv's pooled storage has its own test below")
    cfg = tiny_config
    b, t, n, g, h = 2, 48, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    pol = make(name, budget=0.3)
    q = jnp.asarray(rng.normal(size=(b, t, n * g, h)) * 2, jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, n, h)) * 2, jnp.float32)
    v = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    lengths = np.array([t, t - 9])
    q_pos = jnp.asarray(np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1))
    st = pol.init_layer(0, b, t, 3, cfg, jnp.float32)
    st, _ = pol.prefill(st, q, k, v, q_pos, _layer_ctx(cfg, t, 3))
    kv = st.kv if isinstance(st, ScoredKV) else st
    kept_k, kept_v, kept_pos = kv.k, kv.v, kv.pos
    q1 = jnp.asarray(rng.normal(size=(b, 1, n * g, h)), jnp.float32)
    k1 = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32)
    v1 = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32)
    p1 = jnp.asarray(lengths[:, None], jnp.int32)
    _, out = pol.decode(st, q1, k1, v1, p1, _layer_ctx(cfg, t, 3, "decode"))
    ref_k = jnp.concatenate([kept_k, jnp.swapaxes(k1, 1, 2)], axis=2)
    ref_v = jnp.concatenate([kept_v, jnp.swapaxes(v1, 1, 2)], axis=2)
    ref_pos = jnp.concatenate([kept_pos, jnp.broadcast_to(p1[:, None, :], (b, n, 1))], axis=2)
    ref = attention.attention_reference(q1, ref_k, ref_v, p1, ref_pos).out
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_adakv_pool_gives_heads_different_budgets_and_attends_per_head(tiny_config, rng):
    cfg = tiny_config
    b, t, n, g, h = 1, 64, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    pol = make("adakv", budget=0.25)
    scale = jnp.asarray([4.0, 0.2])[None, None, :, None]  # head 0 peaked, head 1 flat
    q = jnp.asarray(rng.normal(size=(b, t, n * g, h)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * scale
    v = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32)
    q_pos = jnp.arange(t)[None]
    st = pol.init_layer(0, b, t, 1, cfg, jnp.float32)
    st, _ = pol.prefill(st, q, k, v, q_pos, _layer_ctx(cfg, t, 1))
    pos, head = np.asarray(st.pos)[0], np.asarray(st.head)[0]
    per_head = [int(((pos >= 0) & (head == i)).sum()) for i in range(n)]
    assert sum(per_head) == 16 * n and st.k.shape[1] == 16 * n + n
    assert min(per_head) >= int(16 * 0.2)
    q1 = jnp.asarray(rng.normal(size=(b, 1, n * g, h)), jnp.float32)
    k1 = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32)
    st2, out = pol.decode(st, q1, k1, k1, jnp.asarray([[t]]), _layer_ctx(cfg, t, 1, "decode"))
    for i in range(n):  # head i attends to its own kept slots + its new token only
        sel = (np.asarray(st2.head)[0] == i) & (np.asarray(st2.pos)[0] >= 0)
        kk = jnp.asarray(np.asarray(st2.k)[0][sel])[None, None]
        vv = jnp.asarray(np.asarray(st2.v)[0][sel])[None, None]
        pp = jnp.asarray(np.asarray(st2.pos)[0][sel])[None, None]
        ref = attention.attention_reference(q1[:, :, i * g : (i + 1) * g], kk, vv, jnp.asarray([[t]]), pp).out
        np.testing.assert_allclose(out[:, :, i * g : (i + 1) * g], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in EVICTION if make(n).evicts_on_decode])
def test_decode_time_eviction_keeps_size(name, tiny_config, tiny_params, rng):
    pol = make(name, budget=0.25)
    tokens, lengths = _prompts(rng, tiny_config, b=2)
    _, state, _, state2 = _run(tiny_params, tiny_config, pol, tokens, lengths, max_new=12)
    for a, c in zip(state.layers, state2.layers):
        assert a.kv.k.shape == c.kv.k.shape
        kept0, kept1 = (np.asarray(a.kv.pos) >= 0).sum(2), (np.asarray(c.kv.pos) >= 0).sum(2)
        assert np.all(kept1 <= kept0 + 1)
        assert np.all(np.asarray(c.kv.pos).max(2) == np.asarray(state2.lengths)[:, None] - 1)  # newest kept


def test_tova_without_decode_eviction_keeps_its_prompt_choice_and_appends(tiny_config, tiny_params, rng):
    tokens, lengths = _prompts(rng, tiny_config, b=2)
    _, s_on, _, _ = _run(tiny_params, tiny_config, make("tova", budget=0.25), tokens, lengths)
    _, s_off, _, s_off2 = _run(tiny_params, tiny_config, make("tova", budget=0.25, on_decode=False), tokens, lengths)
    new = [set(range(n, n + 5)) for n in np.asarray(lengths).tolist()]
    for a, b, c in zip(s_on.layers, s_off.layers, s_off2.layers):
        assert isinstance(a, ScoredKV) and isinstance(b, SlotKV)
        for r in range(2):
            for h in range(tiny_config.num_kv_heads):
                kept = set(np.asarray(b.pos)[r, h][np.asarray(b.pos)[r, h] >= 0].tolist())
                assert kept == set(np.asarray(a.kv.pos)[r, h][np.asarray(a.kv.pos)[r, h] >= 0].tolist())
                after = np.asarray(c.pos)[r, h]
                assert set(after[after >= 0].tolist()) == kept | new[r]  # nothing evicted, 5 appended


def test_streaming_keeps_sinks_and_recent(tiny_config, tiny_params, rng):
    pol = parse_policy("streaming:budget=0.25,sink=4")
    tokens, lengths = _prompts(rng, tiny_config, b=1)
    _, state, _, state2 = _run(tiny_params, tiny_config, pol, tokens, lengths, max_new=5)
    pos = np.asarray(state.layers[0].kv.pos)[0, 0]
    assert sorted(pos[pos >= 0].tolist()) == [0, 1, 2, 3] + list(range(64 - 12, 64))
    pos2 = np.asarray(state2.layers[0].kv.pos)[0, 0]
    assert sorted(pos2[pos2 >= 0].tolist()) == [0, 1, 2, 3] + list(range(64 + 4 - 12, 64 + 4)) or sorted(
        pos2[pos2 >= 0].tolist()
    ) == [0, 1, 2, 3] + list(range(64 + 4 - 13, 64 + 4))


@pytest.mark.parametrize("scorer", ["snapkv", "tova", "knorm"])
def test_chunkkv_keeps_whole_chunks_shared_by_heads(scorer, tiny_config, tiny_params, rng):
    """Rows of 64, 53 and 41 tokens at 25% kept, chunks of 4: every head keeps the same
    positions, and at most one chunk (the one crossing the budget) is kept in part."""
    pol = parse_policy(f"chunkkv:budget=0.25,chunk=4,scorer={scorer},window=4")
    tokens, lengths = _prompts(rng, tiny_config)
    _, state, _, _ = _run(tiny_params, tiny_config, pol, tokens, lengths, max_new=2)
    for layer in state.layers:
        pos = np.asarray(layer.pos)
        for r, n in enumerate(np.asarray(lengths)):
            kept = [set(p[p >= 0].tolist()) for p in pos[r]]
            assert all(k == kept[0] for k in kept)
            assert len(kept[0]) == int(n * 0.25)
            sizes = np.bincount([p // 4 for p in kept[0]])
            partial = [c for c, m in enumerate(sizes) if 0 < m < min(4, n - 4 * c)]
            assert len(partial) <= 1, (sorted(kept[0]), partial)


def test_chunk_scores_average_each_chunk_over_heads():
    from kvjax.policies.chunkkv import chunk_scores

    scores = jnp.asarray([[[1.0, 3.0, 0.0, 8.0, 5.0], [1.0, 1.0, 2.0, 0.0, 9.0]]])  # [1, 2, 5]
    pos = jnp.asarray([[[0, 1, 2, 3, -1], [0, 1, 2, 3, -1]]])
    out = np.asarray(chunk_scores(scores, pos, 2, 4))
    np.testing.assert_allclose(out[0, 0, :4], [3.0, 3.0, 5.0, 5.0])  # (1+1+3+1)/2, (0+2+8+0)/2
    np.testing.assert_array_equal(out[0, 0], out[0, 1])


def test_chunkkv_rejects_unknown_scorer(tiny_config, tiny_params):
    with pytest.raises(PolicyError, match="chunkkv: scorer='h2o'; expected one of"):
        parse_policy("chunkkv:scorer=h2o")


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, "x"])
@pytest.mark.parametrize("name", EVICTION)
def test_bad_budget(name, budget):
    with pytest.raises(PolicyError, match=f"budget={budget!r} must be a fraction"):
        REGISTRY[name](budget=budget)


@pytest.mark.parametrize("spec", ["snapkv:budget=0.5,window=64", "chunkkv:budget=0.5,window=64"])
def test_a_prompt_not_longer_than_the_window_is_kept_whole(spec, tiny_config, tiny_params):
    """The window is compared with each row's true length (20), not the 32-token bucket."""
    _, state = prefill(
        tiny_params,
        jnp.ones((1, 32), jnp.int32),
        jnp.asarray([20]),
        config=tiny_config,
        policy=parse_policy(spec),
        max_new_tokens=1,
    )
    for layer in state.layers:
        assert all(sorted(p[p >= 0].tolist()) == list(range(20)) for p in np.asarray(layer.pos)[0])


def test_spec_errors():
    with pytest.raises(ValueError, match="unknown policy 'nope'; registered: .*snapkv"):
        parse_policy("nope:budget=0.2")
    with pytest.raises(ValueError, match="policy 'snapkv' has no parameter 'bugdet'"):
        parse_policy("snapkv:bugdet=0.2")
    with pytest.raises(ValueError, match="policy 'snapkv': window='abc' is not a valid int"):
        parse_policy("snapkv:window=abc")
    with pytest.raises(ValueError, match="expected key=value"):
        parse_policy("snapkv:0.2")
    with pytest.raises(ValueError, match="policy spec '' is empty"):
        parse_policy("")


def test_incompatible_composition():
    with pytest.raises(PolicyError, match="cannot compose 'h2o' before .* evicts during decoding"):
        parse_policy("h2o:budget=0.2+kivi:bits=2")
    with pytest.raises(PolicyError, match="cannot compose 'tova' after 'snapkv'"):
        parse_policy("snapkv:budget=0.2+tova:budget=0.5")


def test_every_policy_is_a_registered_policy_class():
    for name, cls in REGISTRY.items():
        assert issubclass(cls, Policy) and cls.name == name
        assert cls.__doc__, f"{name} needs a docstring"


@pytest.mark.parametrize("name", ["snapkv", "h2o"])
def test_long_compressed_caches_are_aligned_for_the_decode_kernel(name, tiny_config, tiny_params, rng, monkeypatch):
    """A compressed cache of at least `slots.ALIGN_FROM` slots is allocated in multiples of
    `slots.SLOT_MULTIPLE` (what the GPU decode kernel reads in place); the spare slots stay
    empty and change nothing: the same logits and tokens as the exact-size cache."""
    from kvjax.policies import slots

    pol = make(name, budget=0.9)
    tokens, lengths = _prompts(rng, tiny_config, b=2, t=1200)
    logits, state, out, _ = _run(tiny_params, tiny_config, pol, tokens, lengths, max_new=3)
    align_from = slots.ALIGN_FROM
    monkeypatch.setattr(slots, "ALIGN_FROM", 1 << 30)
    jax.clear_caches()  # retrace: the policy is a static argument, its programs are cached
    logits_x, exact, out_x, _ = _run(tiny_params, tiny_config, pol, tokens, lengths, max_new=3)
    jax.clear_caches()
    for layer, layer_x in zip(state.layers, exact.layers):
        kv, kv_x = (x.kv if isinstance(x, ScoredKV) else x for x in (layer, layer_x))
        assert kv.capacity % slots.SLOT_MULTIPLE == 0 and kv.capacity >= align_from
        assert kv.capacity > kv_x.capacity and kv_x.capacity % slots.SLOT_MULTIPLE, kv_x.capacity
        assert int(jnp.sum(kv.pos >= 0)) == int(jnp.sum(kv_x.pos >= 0))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(logits_x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_x))
