"""Quest (query-aware page selection): the page bound, the selection against an independent
re-implementation of the paper's per-query-head math, dense decoding at a full budget, bytes
read, compositions and bad input."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import teacher_forced_logits
from hypothesis import given, settings
from hypothesis import strategies as st

from kvjax import attention
from kvjax.generation import decode, prefill
from kvjax.policies import Compose, Dense, PolicyError, Quest, SnapKV, parse_policy
from kvjax.policies.quest import PagedKV, gather_pages, page_bounds, page_scores, select_pages
from kvjax.sampling import Sampler
from kvjax.state import LayerContext, SlotKV


# ---- the page score is an upper bound --------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(
    page=st.sampled_from([1, 2, 4, 16]),
    pages=st.integers(1, 5),
    h=st.sampled_from([4, 32]),
    empty=st.floats(0.0, 0.6),
    scale=st.floats(0.01, 30.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_page_score_bounds_every_key_of_its_page(page, pages, h, empty, scale, seed):
    rng = np.random.default_rng(seed)
    s = page * pages
    k = (rng.standard_normal((1, 1, s, h)) * scale).astype(np.float32)
    pos = np.where(rng.random((1, 1, s)) < empty, -1, np.arange(s)[None, None]).astype(np.int32)
    kv = SlotKV(jnp.asarray(k), jnp.asarray(k), jnp.asarray(pos), jnp.asarray(s, jnp.int32))
    q = (rng.standard_normal((1, 1, 3, h)) * scale).astype(np.float32)
    score = np.asarray(page_scores(jnp.asarray(q), *page_bounds(kv, page)))[0, 0]  # [3, P]
    logits = np.einsum("gh,sh->gs", q[0, 0].astype(np.float64), k[0, 0].astype(np.float64)).reshape(3, pages, page)
    valid = (pos[0, 0] >= 0).reshape(pages, page)
    tol = 1e-5 * (1 + np.abs(logits).max())
    for p in range(pages):
        if not valid[p].any():
            assert np.all(score[:, p] == -np.inf)
            continue
        best = logits[:, p][:, valid[p]].max(axis=1)
        assert np.all(score[:, p] >= best - tol), (score[:, p], best)
        if valid[p].sum() == 1:  # a one-token page: the bound is the logit itself
            np.testing.assert_allclose(score[:, p], best, rtol=1e-5, atol=tol)


def test_page_scores_of_a_bfloat16_cache_track_float32_and_keep_empty_pages_out(rng):
    """A bfloat16 cache's bounds are scored in bfloat16 with float32 accumulation: within
    bfloat16 rounding of the float32 scores of the same (rounded) bounds, -inf for empty pages."""
    k = rng.standard_normal((1, 2, 64, 32)).astype(np.float32)
    pos = np.broadcast_to(np.where(np.arange(64) < 40, np.arange(64), -1), (1, 2, 64)).astype(np.int32)
    q = rng.standard_normal((1, 2, 3, 32)).astype(np.float32)
    kv16 = SlotKV(jnp.asarray(k, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16), jnp.asarray(pos), jnp.asarray(40))
    kmax, kmin = page_bounds(kv16, 16)
    got = np.asarray(page_scores(jnp.asarray(q, jnp.bfloat16), kmax, kmin))
    want = np.asarray(page_scores(jnp.asarray(q), kmax.astype(jnp.float32), kmin.astype(jnp.float32)))
    assert got.dtype == np.float32 and np.all(got[..., 3] == -np.inf) and np.all(np.isfinite(got[..., :3]))
    np.testing.assert_allclose(got[..., :3], want[..., :3], rtol=2e-2, atol=0.1)


# ---- the selection: an independent re-implementation of the paper's algorithm ---------------------
def paper_pages(q_head: np.ndarray, keys: np.ndarray, page: int, k: int) -> set[int]:
    """Quest's selection for one query head over one KV head's keys [S, H] (every slot filled,
    the newest token in the last page), written from the paper: per page and channel the max and
    min key, score = sum_i max(q_i max_i, q_i min_i), the K - 1 best pages other than the newest
    one, plus the newest. Ties (measure zero here) would go to the lower page number."""
    pages = keys.reshape(-1, page, keys.shape[-1])
    score = np.maximum(q_head * pages.max(axis=1), q_head * pages.min(axis=1)).sum(axis=1)
    last = len(pages) - 1
    order = [p for p in np.argsort(-score, kind="stable") if p != last]
    return set(order[: k - 1]) | {last}


@pytest.mark.parametrize("mode", ["max", "union"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_selection_equals_the_paper_per_query_head(rng, mode, k):
    b, n, g, h, page, num_pages = 2, 2, 3, 16, 4, 10
    s = page * num_pages
    keys = rng.standard_normal((b, n, s, h)).astype(np.float32)
    q = rng.standard_normal((b, n, g, h)).astype(np.float32)
    kv = SlotKV(jnp.asarray(keys), jnp.asarray(keys), jnp.broadcast_to(jnp.arange(s), (b, n, s)), jnp.asarray(s))
    pol = Quest(budget=k * page, page=page, gqa=mode)
    rank, width = pol.selection(num_pages, g)
    scores = page_scores(jnp.asarray(q), *page_bounds(kv, page))
    limit = jnp.full((b, n), k, jnp.int32)
    pages, valid = select_pages(scores, num_pages - 1, limit, rank, width, mode)
    pages, valid = np.asarray(pages), np.asarray(valid)
    for bi in range(b):
        for ni in range(n):
            got = set(pages[bi, ni][valid[bi, ni]].tolist())
            per_head = [paper_pages(q[bi, ni, gi], keys[bi, ni], page, k) for gi in range(g)]
            if mode == "union":
                want = set().union(*per_head)
            else:  # one set per KV head: the paper's selection on the max of the group's page scores
                pk = keys[bi, ni].reshape(num_pages, page, h)
                sc = np.maximum(q[bi, ni, :, None] * pk.max(1)[None], q[bi, ni, :, None] * pk.min(1)[None]).sum(-1)
                order = [p for p in np.argsort(-sc.max(0), kind="stable") if p != num_pages - 1]
                want = set(order[: k - 1]) | {num_pages - 1}
                assert len(got) == k
            assert got == want, (bi, ni, got, want)
            count = int(valid[bi, ni].sum())
            assert valid[bi, ni, :count].all()  # selected first: what the kernel reads
            if mode == "max":  # the newest page, then the others by descending score
                assert list(pages[bi, ni, :count]) == [num_pages - 1] + order[: k - 1]
            else:  # in page order
                assert list(pages[bi, ni, :count]) == sorted(got)


def test_decode_step_attends_exactly_over_the_selected_pages(tiny_config, rng):
    """One sparse decode step = exact attention over the gathered selected pages (the new
    token's page included), computed here from the selection math alone."""
    cfg = tiny_config
    b, t, n, g, h = 2, 80, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    pol = Quest(budget=32, page=16, dense_layers=0)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = f(b, t, n * g, h), f(b, t, n, h), f(b, t, n, h)
    lengths = np.array([t, t - 21])
    q_pos = jnp.asarray(np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1), jnp.int32)
    ctx = LayerContext(0, cfg, "prefill", True, t, 4)
    st0, _ = jax.jit(functools.partial(pol.prefill, ctx=ctx))(
        pol.init_layer(0, b, t, 4, cfg, jnp.float32), q, k, v, q_pos
    )
    assert isinstance(st0, PagedKV) and st0.width == 2
    q1, k1, v1 = f(b, 1, n * g, h), f(b, 1, n, h), f(b, 1, n, h)
    p1 = jnp.asarray(lengths[:, None], jnp.int32)
    step = jax.jit(functools.partial(pol.decode, ctx=LayerContext(0, cfg, "decode", True, 0, 4)))
    st1, out = step(st0, q1, k1, v1, p1)
    kmax, kmin = page_bounds(st1.kv, 16)
    np.testing.assert_array_equal(st1.kmax, kmax)  # the appended token updated its page's bounds
    np.testing.assert_array_equal(st1.kmin, kmin)
    scores = page_scores(q1[:, 0].reshape(b, n, g, h), kmax, kmin)
    # each row appended the token after its own prompt: its current page is lengths // 16
    pages, valid = select_pages(scores, jnp.asarray(lengths // 16), jnp.full((b, n), 2), 1, 2, "max")
    kk, vv, pp = gather_pages(st1.kv, pages, valid, 16)
    ref = attention.attention_reference(q1, kk, vv, p1, pp).out
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("question", ["dense", "sparse"])
def test_a_new_turns_question_reads_every_page_unless_sparse(tiny_config, rng, question):
    """A step with ctx.new_turn (a question `Session.ask` appends) attends over every slot under
    question="dense" (the paper prefills its prompt densely), over the selected pages under
    "sparse"; either way the page bounds take the new token, and answer steps stay sparse."""
    cfg = tiny_config
    b, t, n, g, h = 1, 80, cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    pol = Quest(budget=16, page=16, dense_layers=0, question=question)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    q, k, v = f(b, t, n * g, h), f(b, t, n, h), f(b, t, n, h)
    q_pos = jnp.arange(t, dtype=jnp.int32)[None]
    st0, _ = pol.prefill(
        pol.init_layer(0, b, t, 4, cfg, jnp.float32), q, k, v, q_pos, LayerContext(0, cfg, "prefill", True, t, 4)
    )
    q1, k1, v1, p1 = f(b, 1, n * g, h), f(b, 1, n, h), f(b, 1, n, h), jnp.full((b, 1), t, jnp.int32)
    turn = LayerContext(0, cfg, "decode", True, 0, 4, new_turn=True)
    st1, out = pol.decode(st0, q1, k1, v1, p1, turn)
    np.testing.assert_array_equal(st1.kmax, page_bounds(st1.kv, 16)[0])
    full = attention.attention_reference(q1, st1.kv.k, st1.kv.v, p1, st1.kv.pos).out
    _, sparse_out = pol.decode(st0, q1, k1, v1, p1, LayerContext(0, cfg, "decode", True, 0, 4))
    assert not np.allclose(sparse_out, full, atol=1e-3)  # one page of six: the selection differs from dense
    np.testing.assert_allclose(out, full if question == "dense" else sparse_out, rtol=1e-6, atol=1e-6)


# ---- a budget at or above the context is dense decoding --------------------------------------------
@pytest.mark.parametrize("spec", ["quest:budget=1.0,dense_layers=0", "quest:budget=4096,dense_layers=1,gqa=union"])
def test_budget_at_or_above_the_context_is_dense_decoding(spec, tiny_config, tiny_params, rng):
    """Documented behaviour: a budget the context does not fill reads every page, so decoding
    is exactly dense (logits within 1e-5, the same greedy tokens)."""
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, (2, 96)), jnp.int32)
    lengths = jnp.asarray([96, 61], jnp.int32)
    dense, _ = teacher_forced_logits(tiny_params, tiny_config, Dense(), tokens, lengths, 18)
    quest, state = teacher_forced_logits(tiny_params, tiny_config, parse_policy(spec), tokens, lengths, 18)
    np.testing.assert_allclose(quest, dense, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(quest.argmax(-1), dense.argmax(-1))
    assert state.kv_bytes_read_per_step == state.kv_bytes_held  # every page read


def test_small_budget_reads_a_fraction_and_the_kernel_agrees(tiny_config, tiny_params, rng):
    """budget=32 tokens (2 pages of 16) over a 208-slot cache: the sparse layer reads its page
    bounds and 2 pages per (row, KV head); the Pallas kernel (interpret mode on CPU) and the
    gathered reference give the same tokens."""
    cfg = tiny_config
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 192)), jnp.int32)
    lengths = jnp.asarray([192, 150], jnp.int32)
    pol = Quest(budget=32, dense_layers=2)
    outs = []
    for impl in ("reference", "pallas"):
        logits, state = prefill(
            tiny_params, tokens, lengths, config=cfg, policy=pol, max_new_tokens=6, implementation=impl
        )
        held, read = state.kv_bytes_held, state.kv_bytes_read_per_step
        out, _, _ = decode(
            tiny_params, state, logits, jax.random.key(0), config=cfg, policy=pol, max_new_tokens=6,
            sampler=Sampler(), stop_ids=(), implementation=impl,
        )  # fmt: skip
        outs.append(np.asarray(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    sparse = state.layers[2]
    assert isinstance(sparse, PagedKV) and sparse.kv.capacity == 208 and sparse.width == 2
    b, n, h = 2, cfg.num_kv_heads, cfg.head_dim
    slot = 2 * h * 4 + 4  # float32 K and V, int32 position
    dense_layers = 2 * (b * n * 208 * slot + 4)  # every slot, and the fill counter
    bounds, fill = 2 * b * n * 13 * h * 4, 4 * b  # kmax and kmin of 13 pages; a write offset per row
    assert read == dense_layers + bounds + fill + b * n * 2 * 16 * slot
    assert read < 0.75 * held
    # held: the dense cache of the same capacity plus the page bounds
    assert held == dense_layers + b * n * 208 * slot + fill + bounds


# ---- compositions and bad input -------------------------------------------------------------------
def test_snapkv_then_quest_pages_the_kept_slots(tiny_config, tiny_params, rng):
    cfg = tiny_config
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 128)), jnp.int32)
    lengths = jnp.asarray([128, 100], jnp.int32)
    pol = parse_policy("snapkv:budget=0.5,window=8+quest:budget=16,dense_layers=1")
    assert isinstance(pol, Compose)
    logits, state = prefill(tiny_params, tokens, lengths, config=cfg, policy=pol, max_new_tokens=4)
    dense_layer, paged = state.layers[0], state.layers[1]
    assert isinstance(dense_layer, SlotKV) and isinstance(paged, PagedKV)
    kept = np.sum(np.asarray(paged.kv.pos) >= 0, axis=2)
    np.testing.assert_array_equal(kept, np.asarray([[64, 64], [50, 50]]))
    assert paged.kv.capacity == 80
    np.testing.assert_array_equal(paged.kv.fill, [64, 50])  # each row appends after its own kept slots
    out, _, _ = decode(
        tiny_params, state, logits, jax.random.key(0), config=cfg, policy=pol, max_new_tokens=4, sampler=Sampler(),
        stop_ids=(),
    )  # fmt: skip
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) < cfg.vocab_size))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("quest+kivi", "cannot compose 'quest' before 'kivi'.*Quest over a quantized store is not implemented"),
        ("snapkv+quest+kivi", "cannot compose 'quest' before 'kivi'"),
        ("snapkv+kivi+quest", "cannot compose 'quest' after 'kivi': both store the kept tokens"),
        ("tova+quest", "tova evicts during decoding"),
    ],
)
def test_refused_compositions(spec, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(spec)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(budget=0), r"budget=0 must be a fraction"),
        (dict(budget=-3.0), r"budget=-3.0 must be a fraction"),
        (dict(budget=12.5), r"budget=12.5 is above 1, so a token count; it must be a whole number"),
        (dict(page=0), r"page=0 must be an integer >= 1"),
        (dict(gqa="mean"), r"gqa='mean'; expected one of \('max', 'union'\)"),
        (dict(question="exact"), r"question='exact'; expected one of \('dense', 'sparse'\)"),
    ],
)
def test_bad_parameters(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        Quest(**kwargs)


def test_page_size_the_kernel_cannot_take_and_too_many_dense_layers(tiny_config, tiny_params):
    tokens, lengths = jnp.ones((1, 64), jnp.int32), jnp.asarray([64], jnp.int32)
    pol = Quest(budget=32, page=8, dense_layers=2)
    logits, state = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=2)
    kw = dict(config=tiny_config, policy=pol, max_new_tokens=2, sampler=Sampler(), stop_ids=())
    with pytest.raises(PolicyError, match=r"page=8 cannot be read by the sparse decode kernel.*powers of two >= 16"):
        decode(tiny_params, state, logits, jax.random.key(0), implementation="pallas", **kw)
    decode(tiny_params, state, logits, jax.random.key(0), implementation="reference", **kw)  # gathers any page size
    with pytest.raises(PolicyError, match=r"dense_layers=3 leaves no sparse layer in 'tiny' \(3 layers\)"):
        prefill(tiny_params, tokens, lengths, config=tiny_config, policy=Quest(dense_layers=3), max_new_tokens=2)


def test_spec_roundtrip_and_defaults():
    pol = parse_policy("quest:budget=512")
    assert pol == Quest(budget=512.0) and parse_policy(pol.spec()) == pol
    assert Quest().gqa == "max" and Quest().page == 16 and Quest().dense_layers == 2 and Quest().question == "dense"
    assert parse_policy("snapkv:budget=0.5+quest").policies == (SnapKV(budget=0.5), Quest())


def test_cost_times_the_decode_step_from_the_bytes_read(tiny_config):
    """`kvjax.analysis`: concurrency from the bytes held, the decode step from the bytes read
    (Quest at 1/8 of the pages in its sparse layer reads about half of the three layers)."""
    from kvjax.analysis import kv_cache_bytes, kv_read_bytes, serving_estimate

    pol = Quest(budget=0.125)
    held, read = kv_cache_bytes(tiny_config, pol, 512), kv_read_bytes(tiny_config, pol, 512)
    assert read < 0.75 * held and kv_read_bytes(tiny_config, Dense(), 512) == kv_cache_bytes(tiny_config, Dense(), 512)
    r = serving_estimate(tiny_config, pol, 512, "h100", users=4, mbu=1.0)
    assert r["kv_bytes_per_user"] == held and r["kv_read_bytes_per_user"] == read
    assert r["decode_step_s"] == pytest.approx((r["weight_bytes"] + 4 * read) / 3.35e12)
