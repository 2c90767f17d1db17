"""BatchLLM global prefix sharing: the grouping maximises reused tokens, and grouped generation
equals independent generation token for token (greedy)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY

import kvjax
from kvjax.generation.prefix import plan_groups, prefix_tree, reused_tokens
from kvjax.loaders import Model
from kvjax.models import init_params
from kvjax.policies.shared_prefix import SharedPrefixKV


@pytest.fixture(scope="module")
def model(tiny_model):
    p = init_params(TINY, jax.random.key(1))
    p = jax.tree_util.tree_map(lambda x: x * 2.0 if x.ndim == 2 else x, p)
    return Model(TINY, p, tiny_model.tokenizer, jnp.float32, "tiny")


def _lcp(seqs):
    n = 0
    while all(len(s) > n for s in seqs) and len({s[n] for s in seqs}) == 1:
        n += 1
    return n


def _best_by_enumeration(ids, min_prefix):
    """Every partition of the requests into groups, each sharing its longest common prefix
    (each request's last token excluded) when that reaches min_prefix."""

    def partitions(rest):
        if not rest:
            yield []
            return
        first, others = rest[0], rest[1:]
        for k in range(len(others) + 1):
            for mates in itertools.combinations(others, k):
                left = [r for r in others if r not in mates]
                for p in partitions(left):
                    yield [(first, *mates)] + p

    best = 0
    for p in partitions(list(range(len(ids)))):
        total = 0
        for g in p:
            n = _lcp([ids[r][:-1] for r in g])
            if len(g) > 1 and n >= min_prefix:
                total += (len(g) - 1) * n
        best = max(best, total)
    return best


def test_plan_maximises_reused_tokens(rng):
    for _ in range(60):
        n = int(rng.integers(1, 7))
        ids = [rng.integers(0, 3, int(rng.integers(1, 8))).tolist() for _ in range(n)]
        min_prefix = int(rng.integers(1, 4))
        groups = plan_groups(ids, min_prefix)
        assert reused_tokens(groups) == _best_by_enumeration(ids, min_prefix), (ids, min_prefix, groups)
        rows = [r for g in groups for r in g.rows]
        assert len(rows) == len(set(rows))
        for g in groups:
            assert g.prefix_len >= min_prefix and len(g.rows) >= 2
            assert all(ids[r][: g.prefix_len] == ids[g.rows[0]][: g.prefix_len] for r in g.rows)
            assert all(len(ids[r]) > g.prefix_len for r in g.rows)  # every row keeps a suffix token


def test_shorter_prefix_shared_by_more_can_win():
    """Two requests share 20 tokens, five share the first 10: the tree's global choice."""
    a = [5] * 10
    ids = [a + [1] * 10 + [3], a + [1] * 10 + [4], a + [2, 2], a + [3, 3], a + [4, 4], [9, 9, 9]]
    groups = plan_groups(ids, 1)
    assert reused_tokens(groups) == 40 == _best_by_enumeration(ids, 1)
    assert prefix_tree([x[:-1] for x in ids]).depth == 0


DOC = "Shared instructions: answer briefly and name the box. " * 2


@pytest.mark.parametrize(
    "prompts",
    [
        [DOC + "Q1: red?", "Other text entirely.", DOC + "Q2: where is the blue one?", DOC[:60] + "zz", "Other text 2"],
        ["abc def", "xyz uvw rst", "1234567"],  # nothing shared: one ordinary batch
        [DOC + "A", DOC + "B", DOC + "C: longer tail"],  # one group, prefix read once per step
    ],
    ids=["mixed", "nothing-shared", "one-group"],
)
def test_grouped_generation_equals_independent(model, prompts):
    want = kvjax.generate(model, prompts, max_new_tokens=10, stop_ids=[])
    got = kvjax.generate(model, prompts, max_new_tokens=10, stop_ids=[], share_prefixes=8)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.texts == want.texts and got.n_tokens.tolist() == want.n_tokens.tolist()
    ids = [model.tokenizer.encode(p) for p in prompts]
    st = got.stats
    assert st["prompt_tokens"] == sum(len(x) for x in ids) == want.stats["prompt_tokens"]
    assert st["prefill_tokens_saved"] == reused_tokens(plan_groups(ids, 8))
    assert st["prefill_tokens"] == st["prompt_tokens"] - st["prefill_tokens_saved"]
    if len(st["prefix_groups"]) == 1 and len(st["prefix_groups"][0]["rows"]) == len(prompts):
        layer = got.state.layers[0]
        assert isinstance(layer, SharedPrefixKV) and layer.prefix.k.shape[0] == 1


def test_share_prefixes_refusals(model):
    with pytest.raises(ValueError, match="dense cache"):
        kvjax.generate(model, [DOC + "a", DOC + "b"], policy="snapkv:budget=0.5", share_prefixes=True)
    with pytest.raises(ValueError, match="on_token"):
        kvjax.generate(model, [DOC + "a", DOC + "b"], share_prefixes=True, on_token=lambda *a: None)
    with pytest.raises(ValueError, match="share_prefixes=0"):
        kvjax.generate(model, [DOC + "a", DOC + "b"], share_prefixes=0)
