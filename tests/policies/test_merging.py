"""Merging policies (Elastic Cache, KVMerger) against hand-computed numpy references.

The reference semantics of a merging cache: the state holds the merged K/V of each kept
unit at the unit's position, and decoding attends over exactly those merged K/V plus the
new token. Every test draws fresh random inputs (seed printed by the `rng` fixture).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import attention
from kvjax.generation import decode, prefill
from kvjax.policies import PolicyError, parse_policy
from kvjax.policies.elastic_cache import ElasticCache
from kvjax.policies.eviction import ScoredKV
from kvjax.policies.kvmerger import KVMerger, gaussian_merge, merging_sets
from kvjax.sampling import Sampler
from kvjax.state import LayerContext, SlotKV

TOL = dict(rtol=2e-5, atol=2e-5)  # float32 throughout


def _ctx(cfg, t, max_new, phase="prefill", final=True):
    return LayerContext(0, cfg, phase, final, t, max_new)


def jitted(method):
    """A policy's prefill/decode, jit-compiled (the LayerContext argument is static)."""
    return jax.jit(method, static_argnums=5)


def np_probs(q, k, lengths):
    """Causal softmax [B, Nq, T, S] of q [B, T, Nq, H] over k [B, S, N, H] (GQA), float64;
    rows/keys at or beyond each row's length are zero."""
    _b, t, nq, h = q.shape
    kk = np.repeat(k.astype(np.float64), nq // k.shape[2], axis=2)
    logits = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kk) / np.sqrt(h)
    ti, si = np.arange(t)[:, None], np.arange(k.shape[1])[None, :]
    mask = (si <= ti)[None, None] & (ti < lengths[:, None, None, None]) & (si < lengths[:, None, None, None])
    logits = np.where(mask, logits, -np.inf)
    m = np.max(logits, axis=-1, keepdims=True)
    p = np.where(mask, np.exp(logits - np.where(np.isfinite(m), m, 0)), 0.0)
    return p / np.maximum(p.sum(-1, keepdims=True), 1e-300)


def planted_keys(rng, b, t, n, h):
    """Keys in runs of 1-4 near-parallel vectors (cosine ~0.99 inside a run, ~0 across)."""
    k = np.zeros((b, t, n, h))
    for bi in range(b):
        for ni in range(n):
            i = 0
            while i < t:
                run = int(rng.integers(1, 5))
                d = rng.normal(size=h)
                d *= 3 / np.linalg.norm(d) * rng.uniform(0.7, 1.3)
                for j in range(i, min(t, i + run)):
                    k[bi, j, ni] = d + rng.normal(size=h) * 0.05
                i += run
    return k


def random_qkv(rng, cfg, b, t, planted=False):
    nq, n, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = rng.normal(size=(b, t, nq, h))
    k = planted_keys(rng, b, t, n, h) if planted else rng.normal(size=(b, t, n, h)) * 2
    v = rng.normal(size=(b, t, n, h))
    return q, k, v


def positions(lengths, t):
    return np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1)


def kept_by_position(kv: SlotKV, extra=None):
    """{(b, n): {pos: (k, v[, extra])}} of the valid slots."""
    pos, k, v = np.asarray(kv.pos), np.asarray(kv.k), np.asarray(kv.v)
    out = {}
    for bi in range(pos.shape[0]):
        for ni in range(pos.shape[1]):
            sel = np.nonzero(pos[bi, ni] >= 0)[0]
            out[bi, ni] = {
                int(pos[bi, ni, s]): (k[bi, ni, s], v[bi, ni, s])
                + (() if extra is None else (float(extra[bi, ni, s]),))
                for s in sel
            }
    return out


def assert_same_slots(got, want):
    assert got.keys() == want.keys()
    for key in want:
        assert sorted(got[key]) == sorted(want[key]), (key, sorted(got[key]), sorted(want[key]))
        for p, vals in want[key].items():
            for a, b in zip(got[key][p], vals):
                np.testing.assert_allclose(a, b, **TOL)


# ---- Elastic Cache -----------------------------------------------------------------------


def elastic_reference(q, k, v, lengths, budget, sink, group):
    """Anchors by attention frequency (mean over all query heads), mean-merge onto the
    nearest anchor by position (ties: older). {(b, n): {pos: (k, v, weight)}}."""
    p = np_probs(q, k, lengths)  # [B, Nq, T, S]
    freq = p.sum(axis=2).mean(axis=1)  # [B, S]
    out = {}
    for bi, length in enumerate(lengths):
        keep = min(max(int(np.floor(length * budget + 1e-4)), sink + 1), max(length, sink + 1))
        s = np.arange(length)
        prot = (s < sink) | (s == length - 1)
        score = np.where(prot, np.inf, freq[bi, :length])
        anchors = np.sort(np.argsort(-score, kind="stable")[:keep])
        dist = np.abs(s[:, None] - anchors[None, :])
        nearest = anchors[np.argmin(dist, axis=1)]  # argmin takes the first (older) on ties
        for ni in range(k.shape[2]):
            kk, vv = k[bi, :length, ni], v[bi, :length, ni]
            out[bi, ni] = {
                int(a): (kk[nearest == a].mean(0), vv[nearest == a].mean(0), float((nearest == a).sum()))
                for a in anchors
            }
    return out


def test_elastic_prefill_merges_onto_frequency_anchors(tiny_config, rng):
    cfg = tiny_config
    b, t = 2, 40
    q, k, v = random_qkv(rng, cfg, b, t)
    lengths = np.array([t, t - 7])
    pol = ElasticCache(budget=0.3, sink=2)
    st = pol.init_layer(0, b, t, 3, cfg, jnp.float32)
    st, _ = jitted(pol.prefill)(
        st, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(positions(lengths, t)), _ctx(cfg, t, 3)
    )
    assert isinstance(st, ScoredKV) and st.kv.capacity == int(t * 0.3) + 1  # anchors + one spare slot
    want = elastic_reference(q, k, v, lengths, 0.3, 2, cfg.group_size)
    assert_same_slots(kept_by_position(st.kv, np.asarray(st.score)), want)
    np.testing.assert_array_equal(np.asarray(st.limit), [[len(want[i, 0])] * cfg.num_kv_heads for i in range(b)])


def elastic_decode_reference(slots_, new_pos, k1, v1, limit, sink, offset):
    """One decode step on {pos: (k, v, w)} of one (row, head)."""
    s = dict(slots_)
    s[new_pos] = (k1, v1, 1.0)
    if len(s) <= limit:
        return s
    older = sorted((p for p in s if p != new_pos), reverse=True)
    free = [p for p in older if p >= sink]
    victim = free[min(offset - 1, len(free) - 1)] if free else older[-1]
    others = [p for p in s if p != victim]
    anchor = min(others, key=lambda p: (abs(p - victim), p > victim))
    (ka, va, wa), (kv_, vv, wv) = s[anchor], s.pop(victim)
    s[anchor] = ((wa * ka + wv * kv_) / (wa + wv), (wa * va + wv * vv) / (wa + wv), wa + wv)
    return s


def test_elastic_decode_merges_the_truncation_point_and_attends_over_merged_kv(tiny_config, rng):
    cfg = tiny_config
    b, t, n, g, h = 2, 32, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    q, k, v = random_qkv(rng, cfg, b, t)
    lengths = np.array([t, t - 5])
    pol = ElasticCache(budget=0.35, sink=2, offset=3)
    st = pol.init_layer(0, b, t, 8, cfg, jnp.float32)
    st, _ = jitted(pol.prefill)(
        st, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(positions(lengths, t)), _ctx(cfg, t, 8)
    )
    ref = kept_by_position(st.kv, np.asarray(st.score))
    limit = np.asarray(st.limit)
    step = jitted(pol.decode)
    for i in range(6):
        q1, k1, v1 = (rng.normal(size=(b, 1, m, h)) for m in (n * g, n, n))
        p1 = (lengths + i)[:, None]
        # Reference output: attention over the merged KV held now plus the new token.
        kk = jnp.concatenate([st.kv.k, jnp.swapaxes(jnp.asarray(k1, jnp.float32), 1, 2)], axis=2)
        vv = jnp.concatenate([st.kv.v, jnp.swapaxes(jnp.asarray(v1, jnp.float32), 1, 2)], axis=2)
        pp = jnp.concatenate([st.kv.pos, jnp.broadcast_to(jnp.asarray(p1)[:, None, :], (b, n, 1))], axis=2)
        want_out = attention.attention_reference(jnp.asarray(q1, jnp.float32), kk, vv, jnp.asarray(p1), pp).out
        st, out = step(
            st,
            *(jnp.asarray(x, jnp.float32) for x in (q1, k1, v1)),
            jnp.asarray(p1, jnp.int32),
            _ctx(cfg, t, 8, "decode"),
        )
        st = pol.maintain(st, _ctx(cfg, t, 8, "decode"))  # the merge a step leaves pending (lazy eviction)
        np.testing.assert_allclose(out, want_out, **TOL)
        ref = {
            (bi, ni): elastic_decode_reference(
                ref[bi, ni], int(p1[bi, 0]), k1[bi, 0, ni], v1[bi, 0, ni], int(limit[bi, ni]), 2, 3
            )
            for bi in range(b)
            for ni in range(n)
        }
        assert_same_slots(kept_by_position(st.kv, np.asarray(st.score)), ref)
    assert st.kv.capacity == int(t * 0.35) + 1


def test_elastic_chunked_prefill_equals_one_chunk(tiny_config, tiny_params, rng):
    """Frequency accumulates over chunks: chunked and one-shot prefill keep the same anchors."""
    pol = ElasticCache(budget=0.25, sink=2)
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(2, 64)), jnp.int32)
    lengths = jnp.asarray([64, 50], jnp.int32)
    _, one = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=2)
    _, chunked = prefill(
        tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=2, prefill_chunk=16
    )
    for a, c in zip(one.layers, chunked.layers):
        assert_same_slots(kept_by_position(c.kv, np.asarray(c.score)), kept_by_position(a.kv, np.asarray(a.score)))


# ---- KVMerger --------------------------------------------------------------------------------


def kvmerger_reference(q, k, v, lengths, budget, threshold, window, group):
    """Merging sets by consecutive cosine, Gaussian merge onto the max-mass pivot, units kept
    by mass (recent window first). {(b, n): {pos: (k, v)}}."""
    p = np_probs(q, k, lengths)  # [B, Nq, T, S]
    out = {}
    for bi, length in enumerate(lengths):
        keep = min(max(int(np.floor(length * budget + 1e-4)), 1), length)
        for ni in range(k.shape[2]):
            mass = p[bi, ni * group : (ni + 1) * group].sum(axis=(0, 1))[:length]
            kk, vv = k[bi, :length, ni], v[bi, :length, ni]
            recent = np.arange(length) >= length - window
            cos = [kk[s] @ kk[s - 1] / np.linalg.norm(kk[s]) / np.linalg.norm(kk[s - 1]) for s in range(1, length)]
            cands = [s for s in range(1, length) if not recent[s] and not recent[s - 1] and cos[s - 1] >= threshold]
            linked = set(sorted(cands, key=lambda s: (-cos[s - 1], s))[: length - keep])  # at most length - keep links
            sets, cur = [], [0]
            for s in range(1, length):
                if s in linked:
                    cur.append(s)
                else:
                    sets.append(cur)
                    cur = [s]
            sets.append(cur)
            units = {}
            for members in sets:
                piv = members[int(np.argmax(mass[members]))]
                d = ((kk[members] - kk[piv]) ** 2).sum(-1)
                sigma2 = d.sum() / max(len(members) - 1, 1)
                w = np.exp(-d / (2 * sigma2)) if sigma2 > 0 else np.ones(len(members))
                units[piv] = ((w[:, None] * kk[members]).sum(0) / w.sum(), (w[:, None] * vv[members]).sum(0) / w.sum())
            score = {u: (2.0**23 + u if recent[u] else mass[u]) for u in units}
            kept = sorted(units, key=lambda u: -score[u])[:keep]
            out[bi, ni] = {u: units[u] for u in kept}
    return out


def test_merging_sets_follow_consecutive_key_similarity(rng):
    h = 16
    base = rng.normal(size=(4, h))
    base -= base.mean(0)  # well apart
    runs = [3, 1, 2, 4]  # tokens 0-2, 3, 4-5, 6-9
    k = np.concatenate([np.repeat(base[i : i + 1], r, 0) + rng.normal(size=(r, h)) * 1e-3 for i, r in enumerate(runs)])
    mergeable = np.ones(10, bool)
    mergeable[8] = False  # a token outside the mergeable range splits its run
    ids = np.asarray(merging_sets(jnp.asarray(k)[None, None], jnp.asarray(mergeable)[None, None], 0.99))[0, 0]
    np.testing.assert_array_equal(ids, [0, 0, 0, 1, 2, 2, 3, 3, 4, 5])


def test_merging_links_are_capped_most_similar_first(rng):
    """max_links keeps only the most similar links: the budget bounds how much is merged."""
    angles = np.array([0.0, 0.01, 0.5, 0.52, 1.5, 1.5005])  # neighbour gaps 0.01, 0.49, 0.02, 0.98, 0.0005
    k = np.stack([np.cos(angles), np.sin(angles)], -1)
    mergeable = jnp.ones((1, 1, 6), bool)
    ids = merging_sets(jnp.asarray(k)[None, None], mergeable, 0.0, max_links=jnp.asarray([2]))
    np.testing.assert_array_equal(np.asarray(ids)[0, 0], [0, 0, 1, 2, 3, 3])  # the two closest pairs only
    ids = merging_sets(jnp.asarray(k)[None, None], mergeable, 0.0, max_links=jnp.asarray([3]))
    np.testing.assert_array_equal(np.asarray(ids)[0, 0], [0, 0, 1, 1, 2, 2])
    uncapped = merging_sets(jnp.asarray(k)[None, None], mergeable, 0.6)
    np.testing.assert_array_equal(np.asarray(uncapped)[0, 0], [0, 0, 0, 0, 1, 1])  # cos(0.98 rad) = 0.56 < 0.6


def test_gaussian_merge_matches_hand_computation(rng):
    s, h = 9, 8
    k, v = rng.normal(size=(s, h)), rng.normal(size=(s, h))
    score = rng.uniform(size=s)
    set_id = np.array([0, 0, 0, 1, 2, 2, 2, 2, 3])
    kv = SlotKV(
        jnp.asarray(k, jnp.float32)[None, None],
        jnp.asarray(v, jnp.float32)[None, None],
        jnp.arange(s, dtype=jnp.int32)[None, None],
        jnp.asarray(s, jnp.int32),
    )
    merged, is_pivot = gaussian_merge(kv, jnp.asarray(set_id)[None, None], jnp.asarray(score, jnp.float32)[None, None])
    for sid in range(4):
        members = np.nonzero(set_id == sid)[0]
        piv = members[np.argmax(score[members])]
        d = ((k[members] - k[piv]) ** 2).sum(-1)
        sigma2 = d.sum() / max(len(members) - 1, 1)
        w = np.exp(-d / (2 * sigma2)) if len(members) > 1 else np.ones(1)
        assert bool(is_pivot[0, 0, piv]) and int(np.asarray(is_pivot)[0, 0, members].sum()) == 1
        np.testing.assert_allclose(merged.k[0, 0, piv], (w[:, None] * k[members]).sum(0) / w.sum(), **TOL)
        np.testing.assert_allclose(merged.v[0, 0, piv], (w[:, None] * v[members]).sum(0) / w.sum(), **TOL)


def test_kvmerger_prefill_and_decode_against_reference(tiny_config, rng):
    cfg = tiny_config
    b, t, n, g, h = 2, 48, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    q, k, v = random_qkv(rng, cfg, b, t, planted=True)
    lengths = np.array([t, t - 9])
    pol = KVMerger(budget=0.3, threshold=0.9, window=4)
    st = pol.init_layer(0, b, t, 2, cfg, jnp.float32)
    st, _ = jitted(pol.prefill)(
        st, *(jnp.asarray(x, jnp.float32) for x in (q, k, v)), jnp.asarray(positions(lengths, t)), _ctx(cfg, t, 2)
    )
    assert isinstance(st, SlotKV) and st.capacity == int(t * 0.3) + 2
    want = kvmerger_reference(q, k, v, lengths, 0.3, 0.9, 4, g)
    assert_same_slots(kept_by_position(st), want)
    merged_any = any(not np.allclose(kv_[0], k[bi, p, ni]) for (bi, ni), d in want.items() for p, kv_ in d.items())
    assert merged_any, "planted runs should produce at least one merged unit"
    # Decoding attends over exactly the merged K/V (plus the new token).
    q1, k1, v1 = (rng.normal(size=(b, 1, m, h)) for m in (n * g, n, n))
    p1 = lengths[:, None]
    _, out = jitted(pol.decode)(
        st, *(jnp.asarray(x, jnp.float32) for x in (q1, k1, v1)), jnp.asarray(p1, jnp.int32), _ctx(cfg, t, 2, "decode")
    )
    for bi in range(b):
        for ni in range(n):
            items = sorted(want[bi, ni].items())
            kk = np.stack([x[1][0] for x in items] + [k1[bi, 0, ni]])
            vv = np.stack([x[1][1] for x in items] + [v1[bi, 0, ni]])
            logits = np.einsum("gh,sh->gs", q1[bi, 0, ni * g : (ni + 1) * g], kk) / np.sqrt(h)
            pr = np.exp(logits - logits.max(-1, keepdims=True))
            ref = (pr / pr.sum(-1, keepdims=True)) @ vv
            np.testing.assert_allclose(out[bi, 0, ni * g : (ni + 1) * g], ref, **TOL)


def test_kvmerger_chunked_prefill_equals_one_chunk(tiny_config, tiny_params, rng):
    pol = KVMerger(budget=0.25, window=4, threshold=0.5)
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(2, 64)), jnp.int32)
    lengths = jnp.asarray([64, 45], jnp.int32)
    _, one = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=2)
    _, chunked = prefill(
        tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=2, prefill_chunk=32
    )
    for a, c in zip(one.layers, chunked.layers):
        assert_same_slots(kept_by_position(c), kept_by_position(a))


# ---- both -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["elastic:sink=2", "kvmerger:window=4"])
def test_bytes_shrink_with_budget(spec, tiny_config, tiny_params, rng):
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(1, 128)), jnp.int32)
    lengths = jnp.asarray([128], jnp.int32)
    sizes = []
    for budget in (1.0, 0.5, 0.1):
        pol = parse_policy(f"{spec},budget={budget}")
        logits, st = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=4)
        if budget == 0.1:
            _out, _, st2 = decode(
                tiny_params,
                st,
                logits,
                jax.random.key(0),
                config=tiny_config,
                policy=pol,
                max_new_tokens=4,
                sampler=Sampler(),
                stop_ids=(),
            )
            assert st2.nbytes == st.nbytes  # decoding keeps the shapes
        sizes.append(st.nbytes)
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[2] < 0.2 * sizes[0]


def test_bad_inputs(tiny_config, tiny_params):
    with pytest.raises(PolicyError, match="offset=0 must be an integer >= 1"):
        ElasticCache(offset=0)
    with pytest.raises(PolicyError, match="sink=-1 must be an integer >= 0"):
        ElasticCache(sink=-1)
    with pytest.raises(PolicyError, match="threshold=1.5 must be a cosine similarity in \\(-1, 1\\]"):
        KVMerger(threshold=1.5)
    with pytest.raises(PolicyError, match="window=-2 must be an integer >= 0"):
        KVMerger(window=-2)
    with pytest.raises(PolicyError, match="budget=0.0 must be a fraction"):
        parse_policy("kvmerger:budget=0")
    for pol in (KVMerger(window=64), ElasticCache(sink=40)):  # a 20-token row within the window / sinks: kept whole
        _, st = prefill(
            tiny_params,
            jnp.ones((1, 32), jnp.int32),
            jnp.asarray([20]),
            config=tiny_config,
            policy=pol,
            max_new_tokens=1,
        )
        for layer in st.layers:
            pos = np.asarray(layer.kv.pos if isinstance(layer, ScoredKV) else layer.pos)[0]
            assert all(sorted(p[p >= 0].tolist()) == list(range(20)) for p in pos)
    pol = ElasticCache(budget=0.5)
    st = pol.init_layer(0, 1, 16, 2, tiny_config, jnp.float32)
    x = jnp.zeros((1, 2, tiny_config.num_kv_heads, tiny_config.head_dim))
    qx = jnp.zeros((1, 2, tiny_config.num_heads, tiny_config.head_dim))
    with pytest.raises(PolicyError, match="elastic decodes on the merged state its final prefill chunk produces"):
        pol.decode(st.kv, qx, x, x, jnp.asarray([[16, 17]]), _ctx(tiny_config, 16, 2, "decode"))
    with pytest.raises(PolicyError, match="elastic merges one token per decode step; got 2 new tokens"):
        pol.decode(st, qx, x, x, jnp.asarray([[16, 17]]), _ctx(tiny_config, 16, 2, "decode"))
