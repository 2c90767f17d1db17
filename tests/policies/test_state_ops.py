"""State operations: continuing from a state, rollback (`Policy.truncate`), per-row write
offsets, row broadcast/take/set/reset/merge, and the two-level shared-prefix attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from kvjax.attention import attend
from kvjax.generation import decode, prefill
from kvjax.generation.resume import extend, pad_rows
from kvjax.policies import PolicyError, parse_policy, rows, slots
from kvjax.policies.shared_prefix import SharedPrefixKV, shared_prefix_attend
from kvjax.sampling import Sampler
from kvjax.state import SlotKV


@pytest.fixture(scope="module")
def tiny1(tiny_params):
    """`tiny_params`' first layer alone (a third of the compile time; the operations are per layer)."""
    keep = {k: v for k, v in tiny_params["params"].items() if not k.startswith("layers_") or k == "layers_0"}
    return tiny_config(num_layers=1), {"params": keep}


def _prefill(params, cfg, pol, ids_rows, new=32):
    toks, lens = pad_rows(ids_rows, cfg.pad_id, 32)
    return prefill(
        params, jnp.asarray(toks), jnp.asarray(lens), config=cfg, policy=pol, max_new_tokens=new, dtype=jnp.float32
    )


def _distinct(rng, n):
    return rng.choice(np.arange(3, 90), n, replace=False).tolist()


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_continue_from_state_equals_one_prefill(tiny1, rng, phase):
    (cfg, tiny_params), pol = tiny1, parse_policy("dense")
    full = [_distinct(rng, 40), _distinct(rng, 29)]
    cut = [23, 11]
    logits, whole = _prefill(tiny_params, cfg, pol, full)
    _, head = _prefill(tiny_params, cfg, pol, [r[:c] for r, c in zip(full, cut)], new=64)
    toks, lens = pad_rows([r[c:] for r, c in zip(full, cut)], cfg.pad_id)
    got, cont = extend(tiny_params, head, toks, lens, config=cfg, policy=pol, phase=phase)
    np.testing.assert_allclose(np.asarray(got), np.asarray(logits), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cont.lengths), [40, 29])
    for a, b in zip(whole.layers, cont.layers):  # the same (position -> K, V) in every row and head
        for r in range(2):
            for n in range(cfg.num_kv_heads):
                pa, pb = np.asarray(a.pos[r, n]), np.asarray(b.pos[r, n])
                ia, ib = np.argsort(np.where(pa >= 0, pa, 1 << 30)), np.argsort(np.where(pb >= 0, pb, 1 << 30))
                m = int((pa >= 0).sum())
                assert m == int((pb >= 0).sum())
                np.testing.assert_array_equal(pa[ia[:m]], pb[ib[:m]])
                np.testing.assert_allclose(np.asarray(a.k[r, n])[ia[:m]], np.asarray(b.k[r, n])[ib[:m]], atol=1e-5)


def _greedy(params, cfg, pol, state, logits, n=4):
    out, _, _ = decode(
        params,
        jax.tree.map(jnp.copy, state),
        logits,
        jax.random.key(0),
        config=cfg,
        policy=pol,
        max_new_tokens=n,
        sampler=Sampler(),
        stop_ids=(),
        dtype=jnp.float32,
    )
    return np.asarray(out)


# quantized: windows of R + T = 24 slots that hold the prompt's newest 16-21 tokens, so the 5 tokens
# appended below fit without a flush (the case `QuantPolicy.truncate_layer` calls identical)
ROLLBACK = ["dense", "snapkv:budget=0.5,window=8", "adakv:budget=0.5,window=8", "kivi:bits=4,group=8,residual=16"]
ROLLBACK += ["snapkv:budget=0.4,window=8+kivi:bits=4,group=8,residual=16"]


@pytest.mark.parametrize("spec", ROLLBACK)
def test_truncate_equals_never_seen(spec, tiny1, rng):
    """Append accepted + rejected tokens, roll back: the state equals one that only ever saw the
    accepted tokens (leaf for leaf, one row), and both rows of a batch decode the same after."""
    (cfg, tiny_params), pol = tiny1, parse_policy(spec)
    prompts = [_distinct(rng, 40), _distinct(rng, 33)]
    accepted, rejected = [[5, 9, 14], [7]], [[21, 30], [11, 12, 13, 40]]
    for r in range(2):  # one row: leaf-for-leaf identity
        _, s0 = _prefill(tiny_params, cfg, pol, [prompts[r]])
        seen = accepted[r] + rejected[r]
        _, saw = extend(tiny_params, s0, [seen], [len(seen)], config=cfg, policy=pol)
        _, ref = extend(tiny_params, s0, [accepted[r]], [len(accepted[r])], config=cfg, policy=pol)
        cut = pol.truncate(saw, np.asarray(s0.lengths) + len(accepted[r]))
        assert np.asarray(cut.lengths).tolist() == np.asarray(ref.lengths).tolist()
        ref = rows.per_row_fill(ref)
        for a, b in zip(jax.tree_util.tree_leaves(ref.layers), jax.tree_util.tree_leaves(cut.layers)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        # the next tokens are the same
        logits, nxt = extend(tiny_params, cut, [[17]], [1], config=cfg, policy=pol)
        ref_next, nref = extend(tiny_params, ref, [[17]], [1], config=cfg, policy=pol)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_next), atol=1e-4)
        np.testing.assert_array_equal(
            _greedy(tiny_params, cfg, pol, nxt, logits), _greedy(tiny_params, cfg, pol, nref, ref_next)
        )
    # a batch: rows roll back by different amounts, then decode as each row alone would
    _, s0 = _prefill(tiny_params, cfg, pol, prompts)
    toks, lens = pad_rows([a + b for a, b in zip(accepted, rejected)], cfg.pad_id)  # 5 tokens each
    _, saw = extend(tiny_params, s0, toks, lens, config=cfg, policy=pol)
    cut = pol.truncate(saw, np.asarray(s0.lengths) + [len(a) for a in accepted])
    both, _ = extend(tiny_params, cut, [[17], [17]], [1, 1], config=cfg, policy=pol)
    for r in range(2):
        _, one = _prefill(tiny_params, cfg, pol, [prompts[r]])
        _, one = extend(tiny_params, one, [accepted[r]], [len(accepted[r])], config=cfg, policy=pol)
        alone, _ = extend(tiny_params, one, [[17]], [1], config=cfg, policy=pol)
        np.testing.assert_allclose(np.asarray(both[r]), np.asarray(alone[0]), atol=2e-4)


def test_truncate_refusals(tiny1, rng):
    cfg, tiny_params = tiny1
    pol = parse_policy("h2o:budget=0.5")
    _, st = _prefill(tiny_params, cfg, pol, [_distinct(rng, 40)])
    with pytest.raises(PolicyError, match="evicts tokens while decoding"):
        pol.truncate(st, [30])
    pol = parse_policy("kivi:bits=4,group=8,residual=8")
    _, st = _prefill(tiny_params, cfg, pol, [_distinct(rng, 60)])
    with pytest.raises(PolicyError, match="already quantized"):
        pol.truncate(st, [20])
    pol.truncate(st, [60 - pol.rollback_limit()])  # within the limit: exact, accepted
    dense = parse_policy("dense")
    _, st = _prefill(tiny_params, cfg, dense, [_distinct(rng, 10)])
    with pytest.raises(ValueError, match=r"must lie in \[0, tokens seen per row"):
        dense.truncate(st, [11])
    with pytest.raises(ValueError, match="one per row"):
        dense.truncate(st, [3, 4])


def test_per_row_fill_appends_per_row(rng):
    st = SlotKV.empty(2, 1, 8, 4, jnp.float32)
    st = slots.append(st, jnp.ones((2, 3, 1, 4)), jnp.ones((2, 3, 1, 4)), jnp.asarray([[0, 1, 2], [0, 1, 2]]))
    st = slots.truncate_slots(st, jnp.asarray([3, 1]))
    np.testing.assert_array_equal(np.asarray(st.fill), [3, 1])
    st = slots.append(st, 2 * jnp.ones((2, 1, 1, 4)), 2 * jnp.ones((2, 1, 1, 4)), jnp.asarray([[3], [1]]))
    np.testing.assert_array_equal(np.asarray(st.pos[:, 0, :5]), [[0, 1, 2, 3, -1], [0, 1, -1, -1, -1]])
    np.testing.assert_array_equal(np.asarray(st.k[:, 0, :4, 0]), [[1, 1, 1, 2], [1, 2, 0, 0]])


def test_row_operations(tiny1, rng):
    (cfg, tiny_params), pol = tiny1, parse_policy("kivi:bits=4,group=8,residual=16")
    _, one = _prefill(tiny_params, cfg, pol, [_distinct(rng, 30)])
    many = rows.broadcast_rows(one, 3)
    assert many.lengths.shape == (3,)
    for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(rows.take_rows(many, [2]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reset = rows.reset_rows(many, [False, True, False])
    np.testing.assert_array_equal(np.asarray(reset.lengths), [30, 0, 30])
    assert (np.asarray(reset.layers[0].res_pos[1]) == -1).all()
    assert (np.asarray(reset.layers[0].res_len[1]) == 0).all()
    back = rows.set_rows(reset, [1], one)
    for a, b in zip(jax.tree_util.tree_leaves(rows.per_row_fill(many)), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="one-row state"):
        rows.broadcast_rows(many, 2)
    with pytest.raises(ValueError, match="SlotKV"):
        rows.merge_rows(many)


def test_merge_rows_attends_like_the_union(rng):
    """Rows merged into one: attention over the merged slots equals the LSE-merge of the rows'."""
    k = jnp.asarray(rng.normal(size=(3, 2, 8, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(3, 2, 8, 16)), jnp.float32)
    pos = np.tile(np.arange(8, dtype=np.int32), (3, 2, 1)) + 4
    pos[1, :, 5:] = -1
    st = SlotKV(k, v, jnp.asarray(pos), jnp.asarray(8, jnp.int32))
    merged = rows.merge_slots(st, headroom=2)
    assert merged.k.shape == (1, 2, 26, 16) and int(merged.fill) == 24
    q = jnp.asarray(rng.normal(size=(1, 1, 4, 16)), jnp.float32)
    qp = jnp.asarray([[20]])
    got = attend(q, merged.k, merged.v, qp, merged.pos).out
    parts = [attend(q, k[i : i + 1], v[i : i + 1], qp, st.pos[i : i + 1]) for i in range(3)]
    from kvjax.attention import merge_partials

    want, _ = merge_partials([p.out for p in parts], [p.lse for p in parts])
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("t", [1, 5])
def test_shared_prefix_attention_equals_flat(rng, t):
    b, n, g, h, p, s = 3, 2, 3, 16, 37, 12
    pre = SlotKV(
        jnp.asarray(rng.normal(size=(1, n, p + 3, h)), jnp.float32),
        jnp.asarray(rng.normal(size=(1, n, p + 3, h)), jnp.float32),
        jnp.asarray(np.r_[np.arange(p), [-1] * 3][None, None].repeat(n, 1), jnp.int32),
        jnp.asarray(p, jnp.int32),
    )
    own_pos = np.full((b, n, s), -1, np.int32)
    for r, m in enumerate([4, 9, 12]):
        own_pos[r, :, :m] = p + np.arange(m)
    own = SlotKV(
        jnp.asarray(rng.normal(size=(b, n, s, h)), jnp.float32),
        jnp.asarray(rng.normal(size=(b, n, s, h)), jnp.float32),
        jnp.asarray(own_pos),
        jnp.asarray(s, jnp.int32),
    )
    q = jnp.asarray(rng.normal(size=(b, t, n * g, h)), jnp.float32)
    q_pos = jnp.asarray(p + np.array([3, 8, 11])[:, None] - np.arange(t)[::-1][None], jnp.int32)
    got = shared_prefix_attend(q, q_pos, pre, own)
    flat_k = jnp.concatenate([jnp.repeat(pre.k, b, 0), own.k], axis=2)
    flat_v = jnp.concatenate([jnp.repeat(pre.v, b, 0), own.v], axis=2)
    flat_p = jnp.concatenate([jnp.repeat(pre.pos, b, 0), own.pos], axis=2)
    want = attend(q, flat_k, flat_v, q_pos, flat_p, implementation="reference")
    np.testing.assert_allclose(np.asarray(got.out), np.asarray(want.out), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(got.lse), np.asarray(want.lse), atol=1e-5)
    assert isinstance(SharedPrefixKV(pre, own).nbytes_used(), int)
