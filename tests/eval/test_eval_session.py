"""The eval fast paths equal the real thing on a tiny random model.

* `apply_policy(capture(...))` builds the state `prefill(..., policy)` builds, for every
  registered policy that `shares_prefill` (kept positions, K/V, and the decoded tokens);
* appending left-padded pieces for a batch gives each row's logits as appending alone;
* appending T tokens in one decode call equals T single steps where the session does so.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.eval import session
from kvjax.eval.shared import apply_policy, capture, shares_prefill
from kvjax.generation import decode, prefill
from kvjax.policies import REGISTRY, parse_policy
from kvjax.sampling import Sampler


def _specs(pred):
    out = []
    for name, cls in sorted(REGISTRY.items()):
        spec = f"{name}:budget=0.5" if "budget" in cls.parameters() else name
        if "window" in cls.parameters():
            spec += ",window=8"
        try:
            pol = parse_policy(spec)
        except Exception:  # needs artifacts (trained heads, calibrations): not a fast-path candidate
            continue
        if pred(pol):
            out.append(spec)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_config, tiny_params):
    tok = types.SimpleNamespace(eos_ids=(2,), decode=lambda ids: " ".join(str(int(i)) for i in ids))
    return types.SimpleNamespace(config=tiny_config, params=tiny_params, dtype=jnp.float32, tokenizer=tok)


def _leaves(state):
    return jax.tree_util.tree_leaves(state.layers)


@pytest.mark.parametrize("spec", _specs(shares_prefill))
def test_apply_policy_equals_prefill(spec, tiny, rng):
    pol = parse_policy(spec)
    lengths = np.array([40, 29], np.int32)
    toks = rng.integers(3, tiny.config.vocab_size, (2, 64)).astype(np.int32)
    logits_a, ref = prefill(
        tiny.params,
        jnp.asarray(toks),
        jnp.asarray(lengths),
        config=tiny.config,
        policy=pol,
        max_new_tokens=16,
        dtype=tiny.dtype,
    )
    logits_b, cap = capture(tiny, toks, lengths)
    got = apply_policy(tiny, cap, pol, 16)
    np.testing.assert_allclose(np.asarray(logits_a), np.asarray(logits_b), atol=1e-5)
    assert jax.tree_util.tree_structure(ref) == jax.tree_util.tree_structure(got)
    for a, b in zip(_leaves(ref), _leaves(got)):
        assert a.shape == b.shape and a.dtype == b.dtype
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    common = dict(config=tiny.config, policy=pol, max_new_tokens=6, sampler=Sampler(), stop_ids=(), dtype=tiny.dtype)
    out_a = decode(tiny.params, ref, logits_a, jax.random.key(0), **common)[0]
    out_b = decode(tiny.params, got, logits_b, jax.random.key(0), **common)[0]
    np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


def test_apply_policy_refuses_other_policies(tiny, tiny_config):
    class Custom(type(parse_policy("knorm"))):
        def after_prefill(self, state, q, q_pos, res, ctx):
            return state

    _, cap = capture(tiny, np.ones((1, 32), np.int32), np.array([32]))
    with pytest.raises(ValueError, match="does more than compress"):
        apply_policy(tiny, cap, Custom(), 8)


def _distinct(rng, n):
    return rng.choice(np.arange(3, 90), n, replace=False).tolist()


def _row_state(tiny, pol, ids):
    toks = np.asarray([ids + [0] * (64 - len(ids))], np.int32)
    return prefill(
        tiny.params,
        jnp.asarray(toks),
        jnp.asarray([len(ids)]),
        config=tiny.config,
        policy=pol,
        max_new_tokens=64,
        dtype=tiny.dtype,
    )[1]


@pytest.mark.parametrize("spec", _specs(session.pads_safely))
def test_padded_append_equals_single_rows(spec, tiny, rng):
    pol = parse_policy(spec)
    # distinct tokens per row: a repeated token gives equal layer-0 key norms up to RoPE
    # rounding, a near tie that batched and single-row matmuls may break differently
    rows = [_distinct(rng, n + m) for n, m in ((40, 5), (33, 9))]
    ctx, pieces = [r[:n] for r, n in zip(rows, (40, 33))], [r[n:] for r, n in zip(rows, (40, 33))]
    toks = np.zeros((2, 64), np.int32)
    for r, c in enumerate(ctx):
        toks[r, : len(c)] = c
    _, state = prefill(
        tiny.params,
        jnp.asarray(toks),
        jnp.asarray([40, 33]),
        config=tiny.config,
        policy=pol,
        max_new_tokens=64,
        dtype=tiny.dtype,
    )
    both, _ = session.append_tokens(tiny, state, pieces, pol)
    for r in range(2):
        alone, _ = session.append_tokens(tiny, _row_state(tiny, pol, ctx[r]), [pieces[r]], pol)
        np.testing.assert_allclose(np.asarray(both[r]), np.asarray(alone[0]), atol=2e-4)


@pytest.mark.parametrize("spec", _specs(session.appends_in_chunks))
def test_chunked_append_equals_steps(spec, tiny, rng):
    pol = parse_policy(spec)
    row = _distinct(rng, 44)
    state = _row_state(tiny, pol, row[:37])
    toks = jnp.asarray([row[37:]], jnp.int32)
    pos = state.lengths[:, None] + jnp.arange(7)[None]
    kw = dict(config=tiny.config, policy=pol, dtype=tiny.dtype)
    a, _ = session._append(tiny.params, state, toks, pos, chunked=True, **kw)
    b, _ = session._append(tiny.params, state, toks, pos, chunked=False, **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4)


def test_run_session_modes_and_gold_history(tiny, rng):
    """Turn 1 inside the prefill vs appended: the dense cache answers identically."""
    pol = parse_policy("dense")
    ctx = [rng.integers(3, 90, 50).tolist()]
    turns = [[rng.integers(3, 90, 6).tolist(), rng.integers(3, 90, 8).tolist()]]
    a = session.run_session(tiny, pol, ctx, turns, mode="inside", answer_tokens=4)
    b = session.run_session(tiny, pol, ctx, turns, mode="excluded", answer_tokens=4)
    assert a.outputs == b.outputs and len(a.outputs[0]) == 2
    assert a.dense_kv_bytes > b.dense_kv_bytes  # inside: the first question is part of the prefill
    with pytest.raises(ValueError, match="mode='both'"):
        session.run_session(tiny, pol, ctx, turns, mode="both")


def test_excluded_question_is_a_new_turn(tiny, rng):
    """With the question excluded, the eval asks it as a new turn: block offload with a top-k
    covering every block then answers exactly as the dense cache (without the fetch it would
    see only its sinks and window)."""
    ctx = [rng.integers(3, 90, 96).tolist()]
    turns = [[rng.integers(3, 90, 6).tolist(), rng.integers(3, 90, 5).tolist()]]
    dense = session.run_session(tiny, parse_policy("dense"), ctx, turns, mode="excluded", answer_tokens=4)
    off = parse_policy("offload:window=16,block=16,topk=8,sinks=2,offload=device")
    got = session.run_session(tiny, off, ctx, turns, mode="excluded", answer_tokens=4)
    assert got.outputs == dense.outputs
