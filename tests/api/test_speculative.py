"""Speculative decoding (TriForce): lossless at temperature 0, the accept / resample rule's exact
distribution (exhaustive enumeration on a toy vocabulary, chi-square on a model's next token),
rollback to the committed tokens, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config
from scipy import stats as scipy_stats

import kvjax
from kvjax.generation import extend, prefill
from kvjax.generation.resume import pad_rows
from kvjax.generation.speculative import (
    TriForce,
    accept,
    build_levels,
    parse_speculative,
    prefill_levels,
    reevict_layer,
    residual,
    speculative_decode,
)
from kvjax.loaders import Model
from kvjax.models import init_params
from kvjax.policies import PolicyError, TriForceRetrieval, parse_policy, rows
from kvjax.sampling import Sampler
from kvjax.state import SlotKV

PROMPTS = [
    "The quick brown fox jumps over the lazy dog, again and again, while the cat sleeps.",
    "Hello world, this is a test of speculation.",
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z 0 1 2 3 4 5 6 7 8 9 and back to A",
    "short",
]


@pytest.fixture(scope="module")
def tiny1_model(tiny_model):
    """`tiny_model` cut to its first layer (a third of the compile time; the loop is per model)."""
    keep = {k: v for k, v in tiny_model.params["params"].items() if not k.startswith("layers_") or k == "layers_0"}
    return Model(tiny_config(num_layers=1), {"params": keep}, tiny_model.tokenizer, jnp.float32, "tiny1")


def test_greedy_is_lossless(tiny1_model):
    """Temperature 0, one draft level: the tokens equal plain dense decoding's, row for row,
    while drafts are rejected (acceptance < 1) at rows of different lengths."""
    spec = "triforce:budget=16,gamma=3,draft_gamma=0"
    ref = kvjax.generate(tiny1_model, PROMPTS, max_new_tokens=48, stop_ids=[])
    got = kvjax.generate(tiny1_model, PROMPTS, max_new_tokens=48, stop_ids=[], speculative=spec)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.n_tokens, ref.n_tokens)
    assert got.texts == ref.texts
    s = got.stats
    plan = parse_speculative(spec)
    assert len(s["acceptance_rate"]) == plan.levels
    assert all(0.0 <= r < 1.0 for r in s["acceptance_rate"])
    assert 1.0 <= s["tokens_per_verify"] <= plan.gamma + 1
    assert s["target_forwards"] < 48


def test_greedy_lossless_with_a_draft_model_and_stop_ids(tiny1_model):
    """Both levels, a separate draft model (same vocabulary, other weights) at the bottom, and a
    stop id that ends a row mid-round: still the plain tokens and counts."""
    m = tiny1_model
    draft = Model(m.config, init_params(m.config, jax.random.key(7)), m.tokenizer, jnp.float32, "tiny-draft")
    ref = kvjax.generate(m, PROMPTS, max_new_tokens=40, stop_ids=[])
    stop = int(ref.tokens[0, 9])  # row 0 stops at its 10th token (or earlier)
    ref = kvjax.generate(m, PROMPTS, max_new_tokens=40, stop_ids=[stop])
    spec = "triforce:budget=16,gamma=3,draft_gamma=2,sink=4,window=8"
    got = kvjax.generate(m, PROMPTS, max_new_tokens=40, stop_ids=[stop], speculative=spec, draft_model=draft)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    np.testing.assert_array_equal(got.n_tokens, ref.n_tokens)
    assert got.n_tokens[0] <= 10


@pytest.mark.slow
def test_greedy_is_lossless_on_smollm2(smollm2):
    """SmolLM2, 4 prompts of 80-200 tokens (KJV Judges passages; the retrieval level keeps 64)
    in one batch, 16 new tokens, both levels: the tokens equal plain dense decoding's
    (`benchmarks/triforce_bench.py` checks the same on every row of its grid at 2k and 8k)."""
    from kvjax.eval import load_text

    words = load_text("kjv-judges").split()
    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(4):
        start, n = int(rng.integers(0, len(words) - 400)), int(rng.integers(60, 150))
        prompts.append(" ".join(words[start : start + n]))
    spec = "triforce:budget=64,gamma=4,draft_gamma=2,sink=16,window=48"
    ref = kvjax.generate(smollm2, prompts, max_new_tokens=16, stop_ids=[])
    got = kvjax.generate(smollm2, prompts, max_new_tokens=16, stop_ids=[], speculative=spec)
    np.testing.assert_array_equal(got.tokens, ref.tokens)
    assert got.stats["tokens_per_verify"] > 1.0


def test_cli_speculative(tiny1_model, monkeypatch):
    """`kvjax generate --speculative ... --json`: the plain greedy texts and the speculative stats;
    a bad spec fails before a model loads."""
    import json

    from typer.testing import CliRunner

    import kvjax.cli.run as run
    from kvjax.cli import app

    monkeypatch.setattr(run, "load_model", lambda name: tiny1_model)
    args = ["generate", "-p", PROMPTS[0], "-n", "8", "--json", "--speculative", "triforce:budget=16,gamma=3"]
    r = CliRunner().invoke(app, args)
    out = json.loads(r.stdout)
    ref = kvjax.generate(tiny1_model, PROMPTS[0], max_new_tokens=8)
    assert r.exit_code == 0 and out["texts"] == ref.texts
    assert len(out["acceptance_rate"]) == 2 and out["tokens_per_verify"] >= 1
    r = CliRunner().invoke(app, ["generate", "-p", "x", "--speculative", "triforce:window=0"])
    assert r.exit_code == 2 and "window=0 must be an integer >= 1" in r.output


# ---- the accept / resample rule, exactly ------------------------------------------------------


def _cond_tables(rng, v, depth):
    """Random conditional next-token tables: table[prefix tuple] -> distribution [v]."""
    out = {}
    for d in range(depth + 1):
        for prefix in itertools.product(range(v), repeat=d):
            w = rng.random(v) ** 3
            w[rng.integers(v)] = 0.0 if rng.random() < 0.3 else w[0]  # some zero-probability tokens
            out[prefix] = w / w.sum()
    return out


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_accept_reproduces_the_target_distribution_exactly(rng, gamma):
    """Enumerate every draft sequence (probability q) and, per draft, both sides of every
    acceptance threshold (u below / above p/q, weights p/q and 1 - p/q): the first two tokens the
    round emits (the second, when the round emits one token, from the next round's target
    distribution) are distributed exactly as the target's joint p(y1) p(y2 | y1)."""
    v = 3
    p_tab, q_tab = _cond_tables(rng, v, gamma), _cond_tables(rng, v, gamma)
    got = np.zeros((v, v))
    for drafts in itertools.product(range(v), repeat=gamma):
        q = np.stack([q_tab[drafts[:i]] for i in range(gamma)])
        prob_d = np.prod([q[i, drafts[i]] for i in range(gamma)])
        if prob_d == 0:
            continue
        p = np.stack([p_tab[drafts[:i]] for i in range(gamma + 1)])
        a = np.minimum(1.0, p[np.arange(gamma), drafts] / q[np.arange(gamma), drafts])
        for side in itertools.product((0, 1), repeat=gamma):  # 0: u below the threshold
            u = np.where(np.asarray(side) == 0, a / 2, (1 + a) / 2)
            w = np.prod(np.where(np.asarray(side) == 0, a, 1 - a))
            if w == 0:
                continue
            n, _, dist = accept(
                jnp.asarray(p[None], jnp.float32),
                jnp.asarray(q[None], jnp.float32),
                jnp.asarray([drafts], jnp.int32),
                jnp.asarray(u[None], jnp.float32),
                jax.random.key(0),
            )
            n, dist = int(n[0]), np.asarray(dist[0], np.float64)
            emitted = list(drafts[:n])
            if n >= 2:
                got[emitted[0], emitted[1]] += prob_d * w
            elif n == 1:
                got[emitted[0]] += prob_d * w * dist
            else:  # the round emits one token from dist; the next round's first is from p(. | y1)
                for y1 in range(v):
                    got[y1] += prob_d * w * dist[y1] * p_tab[(y1,)]
    want = np.stack([p_tab[()][y1] * p_tab[(y1,)] for y1 in range(v)])
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_residual_and_greedy_rule():
    p = jnp.asarray([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])
    q = jnp.asarray([[[0.2, 0.6, 0.2]]])
    np.testing.assert_allclose(np.asarray(residual(p, q, jnp.asarray([0]))), [[1.0, 0.0, 0.0]], atol=1e-7)
    np.testing.assert_allclose(np.asarray(residual(p, q, jnp.asarray([1]))), [[0.1, 0.1, 0.8]], atol=1e-7)
    # greedy: one-hot distributions; accept while the argmaxes agree, then the target's argmax
    s = Sampler()
    tp = s.probs(jnp.asarray([[[1.0, 5.0, 0.0], [9.0, 0.0, 1.0], [0.0, 0.0, 3.0]]]))
    tq = s.probs(jnp.asarray([[[0.0, 5.0, 1.0], [0.0, 4.0, 1.0]]]))
    n, tok, _ = accept(tp, tq, jnp.asarray([[1, 1]]), jnp.asarray([[0.99, 0.0]]), jax.random.key(0), greedy=True)
    assert (int(n[0]), int(tok[0])) == (1, 0)


def test_sampler_probs_match_what_it_samples(rng):
    logits = jnp.asarray(rng.normal(size=(1, 12)) * 2, jnp.float32)
    s = Sampler(temperature=0.7, top_k=6, top_p=0.9)
    p = np.asarray(s.probs(logits))[0]
    draws = np.asarray(jax.vmap(lambda k: s(logits, k))(jax.random.split(jax.random.key(1), 4000)))[:, 0]
    assert set(np.unique(draws)) <= set(np.flatnonzero(p > 0))
    np.testing.assert_allclose(np.bincount(draws, minlength=12) / 4000, p, atol=0.04)


def _chi_square_ok(samples: np.ndarray, p: np.ndarray, alpha: float = 1e-3) -> tuple[float, float]:
    """(statistic, p-value) of a chi-square goodness-of-fit test, categories with an expected
    count below 5 pooled into one."""
    n = len(samples)
    counts = np.bincount(samples, minlength=len(p)).astype(float)
    big = p * n >= 5
    obs = np.r_[counts[big], counts[~big].sum()]
    exp = np.r_[p[big] * n, p[~big].sum() * n]
    if exp[-1] == 0:
        assert obs[-1] == 0, "a token of zero target probability was emitted"
        obs, exp = obs[:-1], exp[:-1]
    res = scipy_stats.chisquare(obs, exp * obs.sum() / exp.sum())
    return float(res.statistic), float(res.pvalue)


def _one_round_samples(model, policy_spec, prompt_ids, t0, plan, n_rows, runs, sampler):
    """`runs` x `n_rows` samples of the token after `prompt + [t0]` from one speculative round
    (the first token forced to t0 through the first logits). Returns (samples, exact target
    distribution p(. | prompt, t0))."""
    cfg = model.config
    pol = parse_policy(policy_spec)
    levels = build_levels(model, plan, pol)
    toks = jnp.asarray([prompt_ids], jnp.int32)
    lens = jnp.asarray([len(prompt_ids)], jnp.int32)
    first = jnp.full((n_rows, cfg.vocab_size), -1e9, jnp.float32).at[:, t0].set(0.0)
    out = []
    for r in range(runs):
        _, one = prefill_levels(model, levels, toks, lens, len(prompt_ids), len(prompt_ids), 16 + plan.slack)
        states = tuple(rows.broadcast_rows(s, n_rows) for s in one)
        got, n_out, _, _ = speculative_decode(
            (model.params, None),
            states,
            first,
            jax.random.key(100 + r),
            2,
            levels=levels,
            max_new_tokens=16,
            sampler=sampler,
            stop_ids=(),
        )
        assert (np.asarray(got[:, 0]) == t0).all() and (np.asarray(n_out) == 2).all()
        out.append(np.asarray(got[:, 1]))
    _, st = prefill(model.params, toks, lens, config=cfg, policy=pol, max_new_tokens=4)
    logits, _ = extend(model.params, st, [[t0]], [1], config=cfg, policy=pol)
    return np.concatenate(out), np.asarray(sampler.probs(logits)[0], np.float64)


def test_sampled_tokens_follow_the_target_distribution(tiny1_model):
    """Temperature 1 on the one-layer tiny model: 10^4 samples of one next token through a whole
    speculative round (both levels; retrieval draft with 8 of 30 tokens) pass a chi-square test
    against the target's exact distribution (alpha 1e-3). (One level alone is the exhaustive
    enumeration above.)"""
    prompt = [int(x) for x in np.random.default_rng(3).integers(3, 97, 30)]
    plan = TriForce(budget=8, gamma=2, draft_gamma=2, sink=2, window=4)
    samples, p = _one_round_samples(tiny1_model, "dense", prompt, 17, plan, 2500, 4, Sampler(temperature=1.0))
    stat, pval = _chi_square_ok(samples, p)
    assert pval > 1e-3, (stat, pval)


@pytest.mark.slow
def test_accept_rule_on_a_smollm2_distribution(smollm2):
    """The real SmolLM2 at temperature 0.6 over a 300-token prompt: p = the full cache's next-token
    distribution, q = the TriForce retrieval cache's (budget 64). 10^4 drafts drawn from q
    and passed through `accept` give first tokens that pass a chi-square test against p, while
    drafts are rejected at a rate that makes the resample path matter."""
    m = smollm2
    text = "The history of the printing press begins in the fifteenth century. " * 30
    ids = m.tokenizer.encode(text)[:300]
    sampler = Sampler(temperature=0.6)
    levels = build_levels(m, TriForce(budget=64, gamma=1, draft_gamma=0), parse_policy("dense"))
    toks, lens = jnp.asarray([ids[:-1]]), jnp.asarray([len(ids) - 1])
    _, states = prefill_levels(m, levels, toks, lens, len(ids) - 1, len(ids) - 1, 8)
    p, q = (
        sampler.probs(extend(m.params, st, [[ids[-1]]], [1], config=m.config, policy=lev.policy)[0])
        for st, lev in zip(states, levels)
    )
    assert float(jnp.abs(p - q).sum()) > 0.05  # the draft differs from the target

    # the drafts: 10^4 draws from q by numpy (inverse CDF; a [1000, V] Gumbel draw per batch
    # costs a second on CPU), fed to `accept` in batches of 1000 by one compiled program
    q64 = np.asarray(q[0], np.float64)
    drafts = np.random.default_rng(0).choice(q64.size, size=(10, 1000, 1), p=q64 / q64.sum()).astype(np.int32)

    @jax.jit
    def batch(p, q, d, key):
        ku, kr = jax.random.split(key)
        pp = jnp.broadcast_to(p[:, None], (1000, 2, p.shape[-1]))
        qq = jnp.broadcast_to(q[:, None], (1000, 1, q.shape[-1]))
        n, tok, _ = accept(pp, qq, d, jax.random.uniform(ku, (1000, 1)), kr)
        return jnp.where(n >= 1, d[:, 0], tok), jnp.sum(n == 0)

    samples, rejected = [], 0
    for i in range(10):
        first, n_rejected = batch(p, q, drafts[i], jax.random.key(i))
        samples.append(np.asarray(first))
        rejected += int(n_rejected)
    assert rejected > 50
    stat, pval = _chi_square_ok(np.concatenate(samples), np.asarray(p[0], np.float64))
    assert pval > 1e-3, (stat, pval)


# ---- rollback -----------------------------------------------------------------------------


def _slot_map(layer: SlotKV, row: int):
    """{(head, position): (k, v)} of one row of a slot cache."""
    pos, k, v = np.asarray(layer.pos[row]), np.asarray(layer.k[row]), np.asarray(layer.v[row])
    return {
        (n, int(pos[n, s])): (k[n, s], v[n, s])
        for n in range(pos.shape[0])
        for s in range(pos.shape[1])
        if pos[n, s] >= 0
    }


def test_rollback_leaves_the_states_that_never_saw_rejected_tokens(tiny1_model):
    """After a greedy speculative run (many rejected drafts, rows of different lengths), the
    target's and the retrieval level's caches hold exactly the committed tokens: equal, slot
    for slot by position, to caches fed only those tokens."""
    m, cfg = tiny1_model, tiny1_model.config
    plan = TriForce(budget=16, gamma=3, draft_gamma=2, sink=4, window=8)
    levels = build_levels(m, plan, parse_policy("dense"))
    ids = [m.tokenizer.encode(p) for p in PROMPTS[:3]]
    toks, lens = pad_rows(ids, cfg.pad_id, 32)
    w = toks.shape[1]
    first, states = prefill_levels(m, levels, jnp.asarray(toks), jnp.asarray(lens), w, w, 32 + plan.slack)
    out, n_out, states, info = speculative_decode(
        (m.params, None), states, first, jax.random.key(0), 24, levels=levels, max_new_tokens=32, sampler=Sampler(),
        stop_ids=(),
    )  # fmt: skip
    assert float(info["accepted"][0]) < float(info["proposed"][0])
    out, n_out = np.asarray(out), np.asarray(n_out)
    for r in range(3):
        fed = list(out[r, : n_out[r] - 1])  # the last token is pending (fed by the next round)
        one = tuple(rows.take_rows(s, [r]) for s in states)
        assert int(one[0].lengths[0]) == lens[r] + len(fed)
        _, ref = prefill_levels(m, levels[:2], jnp.asarray(toks[r : r + 1]), jnp.asarray(lens[r : r + 1]), w, w, 64)
        ref = tuple(
            extend(m.params, s, [fed], [len(fed)], config=cfg, policy=lev.policy)[1] for s, lev in zip(ref, levels)
        )
        for got_state, want_state in zip(one[:2], ref):
            for a, b in zip(got_state.layers, want_state.layers):
                ga, gb = _slot_map(a, 0), _slot_map(b, 0)
                assert ga.keys() == gb.keys()
                for key in ga:
                    np.testing.assert_allclose(ga[key][0], gb[key][0], atol=1e-4)
                    np.testing.assert_allclose(ga[key][1], gb[key][1], atol=1e-4)
        # the StreamingLLM level holds the sinks and the window before the pending token
        sl = one[2].layers[0]
        length = int(one[2].lengths[0])
        want = set(range(min(plan.sink, length))) | set(range(max(length - plan.window, 0), length))
        assert {p for (_, p) in _slot_map(sl, 0)} == want


def test_reevict_keeps_sinks_and_window():
    pos = np.full((2, 1, 12), -1, np.int32)
    pos[0, 0, :10] = np.arange(10)
    pos[1, 0, :5] = np.arange(5)
    k = np.arange(2 * 12 * 2, dtype=np.float32).reshape(2, 1, 12, 2)
    layer = SlotKV(jnp.asarray(k), jnp.asarray(k), jnp.asarray(pos), jnp.asarray([10, 5], jnp.int32))
    out = reevict_layer(layer, jnp.asarray([10, 5]), 2, 3)
    assert out.capacity == 12 and int(out.fill) == 5
    np.testing.assert_array_equal(np.asarray(out.pos[:, 0, :6]), [[0, 1, 7, 8, 9, -1], [0, 1, 2, 3, 4, -1]])
    np.testing.assert_array_equal(np.asarray(out.k[0, 0, 2]), k[0, 0, 7])


# ---- bad input ------------------------------------------------------------------------------


def test_bad_input(tiny1_model):
    m = tiny1_model
    with pytest.raises(ValueError, match="gamma=0 must be an integer >= 1"):
        kvjax.generate(m, "hi", speculative="triforce:gamma=0")
    with pytest.raises(ValueError, match="draft_gamma=-1"):
        TriForce(draft_gamma=-1)
    with pytest.raises(ValueError, match="unknown method 'medusa'"):
        parse_speculative("medusa:gamma=2")
    with pytest.raises(ValueError, match="'bugdet=3' is not key=value"):
        parse_speculative("triforce:bugdet=3")
    with pytest.raises(PolicyError, match=r"budget=0 must be a fraction of the prompt in \(0, 1\] or a token count"):
        parse_speculative("triforce:budget=0")
    other = Model(tiny_config(num_layers=1, vocab_size=101), None, m.tokenizer, jnp.float32, "tiny-101")
    with pytest.raises(ValueError, match=r"vocabulary \(101 tokens\) differs from the target's \(97\)"):
        kvjax.generate(m, "hi", speculative="triforce:budget=8", draft_model=other)
    with pytest.raises(ValueError, match="needs draft_gamma >= 1"):
        kvjax.generate(m, "hi", speculative="triforce:budget=8,draft_gamma=0", draft_model=m)
    with pytest.raises(PolicyError, match="evicts tokens while decoding and cannot be rolled back"):
        kvjax.generate(m, "hi", policy="h2o:budget=0.5", speculative="triforce:budget=8")
    with pytest.raises(PolicyError, match="can roll back only 8 tokens exactly; gamma=9"):
        kvjax.generate(m, "hi", policy="kivi:bits=4,group=8,residual=8", speculative="triforce:budget=8,gamma=9")
    with pytest.raises(ValueError, match="stop strings are not supported"):
        kvjax.generate(m, "hi", stop="x", speculative="triforce:budget=8")
    with pytest.raises(ValueError, match="prefills the prompt whole"):
        kvjax.generate(m, "hi", prefill_chunk=8, speculative="triforce:budget=8")
    with pytest.raises(ValueError, match="on_token and share_prefixes"):
        kvjax.generate(m, "hi", on_token=print, speculative="triforce:budget=8")
    assert isinstance(build_levels(m, TriForce(budget=8), parse_policy("dense"))[1].policy, TriForceRetrieval)


@pytest.mark.slow
@pytest.mark.usefixtures("xla_passes_off")  # a tiny random model: compile-bound
def test_benchmark_smoke(monkeypatch, tmp_path):
    """benchmarks/triforce_bench.py --smoke, both modes, on a tiny random model (what a real run
    would break on): every grid row equals plain greedy decoding at temperature 0."""
    import importlib.util
    import pathlib

    bench = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("triforce_bench", bench / "triforce_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--smoke", "--gammas", "2", "--temperatures", "0,0.6", "--out", str(tmp_path / "r.json")])
    assert res["grid"] and all(r["equals_plain_greedy"] for r in res["grid"] if r["temperature"] == 0)
    assert all(r.get("equals_plain_greedy", True) for r in res["wall"])
    row = mod.main(["--smoke", "--device", "gpu", "--gammas", "2"])
    assert row["target_1_token_ms"] > 0 and row["target_3_tokens_ms"] > 0 and row["retrieval_draft_1_token_ms"] > 0
