"""Locret: retaining-head checkpoints, (chunked) prefill eviction against a numpy reference,
and the shipped SmolLM2 heads against the true causal importance on held-out text."""

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention
from kvjax.generation import decode, prefill
from kvjax.models.rope import apply_rope
from kvjax.policies import PolicyError, parse_policy
from kvjax.policies import locret_train as lt
from kvjax.policies.eviction import ScoredKV
from kvjax.policies.locret import HeadsError, Locret, default_path, load_heads
from kvjax.sampling import Sampler
from kvjax.state import LayerContext, SlotKV

TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def heads_path(tmp_path_factory, tiny_config):
    """Random retaining heads for the tiny model (eviction logic does not need trained ones)."""
    heads = {k: np.asarray(v) for k, v in lt.init_heads(tiny_config, 16, jax.random.key(1)).items()}
    return lt.save_heads(str(tmp_path_factory.mktemp("locret") / "heads"), tiny_config, heads, {"note": "random"})


def _ctx(cfg, t, max_new, phase="prefill", final=True):
    return LayerContext(0, cfg, phase, final, t, max_new)


def jitted(method):
    """A policy's prefill/decode, jit-compiled (the LayerContext argument is static)."""
    return jax.jit(method, static_argnums=5)


def np_scores(heads, layer, q_pre, k_pre, v):
    """Reference head scores [B, T, N] from pre-RoPE q [B, T, Nq, H], k, v [B, T, N, H]."""
    b, t = q_pre.shape[:2]
    x = np.concatenate([q_pre.reshape(b, t, -1), k_pre.reshape(b, t, -1), v.reshape(b, t, -1)], -1)
    h = x @ heads["w1"][layer]
    return (h / (1 + np.exp(-h))) @ heads["w2"][layer]


def random_chunk(rng, cfg, b, t, offset, lengths):
    """Pre-RoPE q, k, v and their post-RoPE q/k at positions offset..offset+t-1 (-1 past each row)."""
    pos = offset + np.arange(t)[None].repeat(b, 0)
    pos = np.where(pos < lengths[:, None], pos, -1)
    q = rng.normal(size=(b, t, cfg.num_heads, cfg.head_dim))
    k = rng.normal(size=(b, t, cfg.num_kv_heads, cfg.head_dim)) * 2
    v = rng.normal(size=(b, t, cfg.num_kv_heads, cfg.head_dim))
    jp = jnp.asarray(np.maximum(pos, 0))
    q_post = np.asarray(apply_rope(jnp.asarray(q, jnp.float32), jp, cfg))
    k_post = np.asarray(apply_rope(jnp.asarray(k, jnp.float32), jp, cfg))
    return q, k, v, q_post, k_post, pos


def reference_locret(score_chunks, pos_chunks, lengths, budget, kept, stabilizers):
    """Per (row, head) kept positions after Locret's chunked eviction (numpy)."""
    b, _, n = score_chunks[0].shape
    out = {}
    for bi in range(b):
        for ni in range(n):
            cache = {}
            for c, (sc, ps) in enumerate(zip(score_chunks, pos_chunks)):
                cache.update({int(p): float(s) for p, s in zip(ps[bi], sc[bi, :, ni]) if p >= 0})
                newest = max(cache)
                rank = {p: (2.0**23 + p if p > newest - stabilizers else s) for p, s in cache.items()}
                final = c == len(score_chunks) - 1
                keep = int(np.floor(lengths[bi] * budget + 1e-4)) if final else kept
                cache = {p: cache[p] for p in sorted(cache, key=lambda p: -rank[p])[: max(keep, 1)]}
            out[bi, ni] = sorted(cache)
    return out


def kept_positions(kv: SlotKV):
    pos = np.asarray(kv.pos)
    return {
        (bi, ni): sorted(int(p) for p in pos[bi, ni] if p >= 0)
        for bi in range(pos.shape[0])
        for ni in range(pos.shape[1])
    }


@pytest.mark.parametrize("chunk", [0, 12])
def test_prefill_eviction_matches_reference(chunk, tiny_config, heads_path, rng):
    cfg = tiny_config
    b, t, budget, stab = 2, 48, 0.3, 3
    lengths = np.array([t, t - 10])
    pol = Locret(budget=budget, chunk=chunk, stabilizers=stab, calibration=heads_path)
    heads = load_heads(cfg, heads_path)
    kept = int(t * budget)
    st = pol.init_layer(0, b, t, 4, cfg, jnp.float32)
    assert st.kv.capacity == (t if not chunk else kept + chunk)
    size = chunk or t
    scores, poss, originals = [], [], {}
    pf = jitted(pol.prefill)
    for c in range(t // size):
        q, k, v, q_post, k_post, pos = random_chunk(rng, cfg, b, size, c * size, lengths)
        final = c == t // size - 1
        st, _out = pf(
            st,
            *(jnp.asarray(x, jnp.float32) for x in (q_post, k_post, v)),
            jnp.asarray(pos, jnp.int32),
            _ctx(cfg, t, 4, final=final),
        )
        if not final:
            assert isinstance(st, ScoredKV) and st.kv.capacity == kept + chunk  # fixed shapes across chunks
        scores.append(np_scores(heads, 0, q, k, v))
        poss.append(pos)
        for bi in range(b):
            for j in range(size):
                if pos[bi, j] >= 0:
                    originals[bi, int(pos[bi, j])] = (k_post[bi, j], v[bi, j])
    assert isinstance(st, SlotKV) and st.capacity == kept + 4
    want = reference_locret(scores, poss, lengths, budget, kept, stab)
    assert kept_positions(st) == want
    kk, vv, pp = np.asarray(st.k), np.asarray(st.v), np.asarray(st.pos)
    for (bi, ni), ps in want.items():
        for p in ps:
            s = int(np.nonzero(pp[bi, ni] == p)[0][0])
            np.testing.assert_allclose(kk[bi, ni, s], originals[bi, p][0][ni], **TOL)  # evicted, not altered
            np.testing.assert_allclose(vv[bi, ni, s], originals[bi, p][1][ni], **TOL)


def test_decode_after_compression_equals_attention_over_kept(tiny_config, heads_path, rng):
    cfg = tiny_config
    b, t, n, g, h = 2, 40, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    lengths = np.array([t, t - 6])
    pol = Locret(budget=0.25, stabilizers=2, calibration=heads_path)
    _, _, v, q_post, k_post, pos = random_chunk(rng, cfg, b, t, 0, lengths)
    st = pol.init_layer(0, b, t, 2, cfg, jnp.float32)
    st, _ = jitted(pol.prefill)(
        st, *(jnp.asarray(x, jnp.float32) for x in (q_post, k_post, v)), jnp.asarray(pos, jnp.int32), _ctx(cfg, t, 2)
    )
    q1, k1, v1 = (jnp.asarray(rng.normal(size=(b, 1, m, h)), jnp.float32) for m in (n * g, n, n))
    p1 = jnp.asarray(lengths[:, None], jnp.int32)
    _, out = jitted(pol.decode)(st, q1, k1, v1, p1, _ctx(cfg, t, 2, "decode"))
    ref = attention.attention_reference(
        q1,
        jnp.concatenate([st.k, jnp.swapaxes(k1, 1, 2)], 2),
        jnp.concatenate([st.v, jnp.swapaxes(v1, 1, 2)], 2),
        p1,
        jnp.concatenate([st.pos, jnp.broadcast_to(p1[:, None], (b, n, 1))], 2),
    ).out
    np.testing.assert_allclose(out, ref, **TOL)


def test_generate_with_chunked_prefill_and_bytes_shrink(tiny_config, tiny_params, heads_path, rng):
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(2, 64)), jnp.int32)
    lengths = jnp.asarray([64, 41], jnp.int32)
    sizes = []
    for budget in (0.5, 0.1):
        pol = Locret(budget=budget, chunk=16, stabilizers=4, calibration=heads_path)
        init = pol.init_state(tiny_config, 2, 64, 3, jnp.float32)
        assert init.layers[0].kv.capacity == int(64 * budget) + 16  # budget + chunk while prefilling
        logits, st = prefill(
            tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=3, prefill_chunk=16
        )
        if budget == 0.1:
            _out, _n_out, st2 = decode(
                tiny_params,
                jax.tree.map(jnp.copy, st),  # decode donates its input; `st` is read below
                logits,
                jax.random.key(0),
                config=tiny_config,
                policy=pol,
                max_new_tokens=3,
                sampler=Sampler(),
                stop_ids=(),
            )
            np.testing.assert_array_equal(np.asarray(st2.lengths), [66, 43])
            assert st2.nbytes == st.nbytes
        for layer in st.layers:
            kept = (np.asarray(layer.pos) >= 0).sum(2)
            assert np.all(kept == np.floor(np.asarray(lengths) * budget + 1e-4)[:, None])
        sizes.append(st.nbytes)
    assert sizes[1] < 0.4 * sizes[0]
    composed = parse_policy(f"locret:budget=0.25,chunk=16,calibration={heads_path}+kivi:bits=4")
    logits, st = prefill(
        tiny_params, tokens, lengths, config=tiny_config, policy=composed, max_new_tokens=2, prefill_chunk=16
    )
    assert np.all(np.isfinite(np.asarray(logits)))


def test_checkpoint_roundtrip(tmp_path, tiny_config, rng):
    heads = {"w1": rng.normal(size=(3, 320, 8)).astype(np.float32), "w2": rng.normal(size=(3, 8, 2)).astype(np.float32)}
    path = lt.save_heads(str(tmp_path / "h"), tiny_config, heads, {"steps": 7})
    got = load_heads(tiny_config, path)
    for k in heads:
        np.testing.assert_array_equal(got[k], heads[k].astype(np.float16).astype(np.float32))  # stored as float16
    assert Locret(calibration=path) == parse_policy(Locret(calibration=path).spec())


def test_wrong_model_missing_and_malformed_checkpoints(tmp_path, tiny_config, heads_path):
    other = dataclasses.replace(tiny_config, name="other")
    with pytest.raises(
        HeadsError,
        match="trained for another model \\(model='tiny', num_layers=3.*this model has model='other', num_layers=3",
    ):
        load_heads(other, heads_path)
    with pytest.raises(HeadsError, match="num_layers=3, .*this model has model='tiny', num_layers=4"):
        load_heads(dataclasses.replace(tiny_config, num_layers=4), heads_path)
    with pytest.raises(
        HeadsError, match=re.escape(f"no Locret retaining heads for model 'tiny' at {tmp_path}/nope; train")
    ):
        load_heads(tiny_config, str(tmp_path / "nope"))
    bad = lt.save_heads(str(tmp_path / "bad"), tiny_config, {"w1": np.zeros((3, 5, 4)), "w2": np.zeros((3, 4, 2))})
    with pytest.raises(HeadsError, match="have shapes .*'w1': \\(3, 5, 4\\).*expected w1 \\[3, 320, D\\]"):
        load_heads(tiny_config, bad)
    os.makedirs(tmp_path / "junk")
    with pytest.raises(HeadsError, match="cannot read a Locret retaining-head checkpoint at"):
        load_heads(tiny_config, str(tmp_path / "junk"))
    shipped = default_path(dataclasses.replace(tiny_config, name="Smollm2 135M 8k Lc100K Mix1 Ep2"))
    with pytest.raises(HeadsError, match="model='Smollm2 135M 8k Lc100K Mix1 Ep2', num_layers=30.*model='tiny'"):
        load_heads(tiny_config, shipped)


def test_bad_inputs(tiny_config, tiny_params, heads_path):
    with pytest.raises(PolicyError, match="budget=1.5 must be a fraction"):
        Locret(budget=1.5)
    with pytest.raises(PolicyError, match="chunk=-4 must be an integer >= 0"):
        Locret(chunk=-4)
    with pytest.raises(PolicyError, match="stabilizers=2.5 must be an integer >= 0"):
        Locret(stabilizers=2.5)
    toks, lens = jnp.ones((1, 64), jnp.int32), jnp.asarray([60])
    with pytest.raises(HeadsError, match="no Locret retaining heads for model 'tiny'"):
        prefill(tiny_params, toks, lens, config=tiny_config, policy=Locret(), max_new_tokens=1)
    with pytest.raises(
        PolicyError,
        match="a prefill chunk of 32 tokens does not fit next to the 57 kept slots in a "
        "cache of 64; set locret:chunk=32",
    ):
        prefill(
            tiny_params,
            toks,
            lens,
            config=tiny_config,
            policy=Locret(budget=0.9, calibration=heads_path),
            max_new_tokens=1,
            prefill_chunk=32,
        )
    with pytest.raises(
        PolicyError, match="a prompt chunk of 64 tokens exceeds the cache of 28 slots \\(locret:chunk=16\\)"
    ):
        prefill(
            tiny_params,
            toks,
            lens,
            config=tiny_config,
            policy=Locret(chunk=16, calibration=heads_path),
            max_new_tokens=1,
        )
    pol = Locret(calibration=heads_path)
    st = pol.init_layer(0, 1, 16, 1, tiny_config, jnp.float32)
    x = jnp.zeros((1, 1, tiny_config.num_kv_heads, tiny_config.head_dim))
    with pytest.raises(PolicyError, match="locret decodes on the SlotKV its final prefill chunk produces"):
        pol.decode(
            st,
            jnp.zeros((1, 1, tiny_config.num_heads, tiny_config.head_dim)),
            x,
            x,
            jnp.asarray([[16]]),
            _ctx(tiny_config, 16, 1, "decode"),
        )


# Measured with the shipped heads on this window (the held-out tail of pydoc, 512 context
# tokens scored by the next 256 queries): mean Spearman 0.64 over layers and KV heads, every
# layer >= 0.46 (benchmarks/train_locret.py reports 0.60 on its 1024-token held-out windows).
# The thresholds sit well below the measurement: they catch broken heads or inputs, not noise.
HELD_OUT_SPEARMAN_MIN = 0.45
LAYER_SPEARMAN_MIN = 0.2


@pytest.mark.slow
def test_shipped_heads_predict_causal_importance_on_held_out_text(smollm2):
    from kvjax.eval import load_text

    heads = load_heads(smollm2.config)
    _, held = lt.text_windows(smollm2.tokenizer, [load_text("pydoc")], 768, 1)
    x, y = lt.collect(smollm2, held, 512)
    rho = lt.rank_correlation(heads, x, y)
    print("held-out Spearman per layer", np.round(rho.mean(axis=(0, 2)), 2), "mean", rho.mean())
    assert rho.mean() > HELD_OUT_SPEARMAN_MIN
    assert np.all(rho.mean(axis=(0, 2)) > LAYER_SPEARMAN_MIN)
