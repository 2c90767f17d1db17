"""kvjax.serve: the token-budget scheduler (pure Python, hypothesis) and the continuous-batching
engine on the tiny model: every greedy request equals `kvjax.generate` of it alone, whatever
else shares the batch and whenever it arrives; sampling, stops, cancellation, admission."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

import kvjax
from kvjax.serve import Engine
from kvjax.serve import scheduler as sch

# ---- scheduler properties -----------------------------------------------------------


def _simulate(reqs, rows, budget, min_chunk, min_final, policy):
    """Run the scheduler over requests (arrival step, prompt length, tokens to decode) with
    `rows` slots; check every step's plan; return the chunks each request got."""
    waiting = sorted(range(len(reqs)), key=lambda i: reqs[i][0])
    prefilling: list[sch.Prefilling] = []
    decoding: dict[int, int] = {}  # rid -> tokens left
    chunks: dict[int, list[sch.Chunk]] = {i: [] for i in range(len(reqs))}
    finished: list[int] = []
    step = 0
    while len(finished) < len(reqs):
        assert step < 10_000, "no progress"
        while waiting and reqs[waiting[0]][0] <= step and len(prefilling) + len(decoding) < rows:
            i = waiting.pop(0)
            length = reqs[i][1]
            prefilling.append(sch.Prefilling(i, length, 0, sch.prefill_bucket(length)))
        plan = sch.schedule(list(decoding), prefilling, budget, min_chunk=min_chunk, min_final=min_final, policy=policy)
        assert plan.tokens <= budget
        if policy == "stall-free" or not prefilling:
            assert sorted(plan.decodes) == sorted(decoding)  # every running request gets its token
        else:
            assert plan.decodes == []
        if prefilling and budget - len(plan.decodes) >= sch.min_budget(0, min_chunk, min_final):
            assert plan.chunks, "a prompt waited although the budget had room"
        for rid in plan.decodes:
            decoding[rid] -= 1
            if decoding[rid] == 0:
                del decoding[rid]
                finished.append(rid)
        for c in plan.chunks:
            p = next(p for p in prefilling if p.rid == c.rid)
            pow2 = c.width & (c.width - 1) == 0 and c.width <= sch.QUANTUM
            assert pow2 or c.width % sch.QUANTUM == 0, c
            assert c.width >= min_chunk and c.tokens <= c.width
            assert p.fed + c.width <= p.bucket
            chunks[c.rid].append(c)
            fed = p.fed + c.tokens
            prefilling = [q if q.rid != c.rid else sch.Prefilling(q.rid, q.length, fed, q.bucket) for q in prefilling]
            if c.final:
                assert fed == p.length
                assert c.tokens >= min(min_final, p.length)
                prefilling = [q for q in prefilling if q.rid != c.rid]
                if reqs[c.rid][2] > 0:
                    decoding[c.rid] = reqs[c.rid][2]
                else:
                    finished.append(c.rid)
            else:
                assert c.tokens == c.width and fed < p.length
        step += 1
    return chunks, finished


@settings(max_examples=25, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(0, 6), st.integers(1, 300), st.integers(0, 5)), min_size=1, max_size=10),
    rows=st.integers(1, 5),
    extra=st.integers(0, 200),
    min_final=st.sampled_from([0, 8, 64]),
    policy=st.sampled_from(sch.SCHEDULES),
)
def test_scheduler_properties(reqs, rows, extra, min_final, policy):
    """Budget never exceeded, every running decode gets a token each step (stall-free), a
    prompt's chunks add up to its length, no request lost or duplicated."""
    budget = sch.min_budget(rows, 16, min_final) + extra
    chunks, finished = _simulate(reqs, rows, budget, 16, min_final, policy)
    assert sorted(finished) == list(range(len(reqs)))
    for i, (_, length, _) in enumerate(reqs):
        assert sum(c.tokens for c in chunks[i]) == length
        assert [c.final for c in chunks[i]] == [False] * (len(chunks[i]) - 1) + [True]


def test_scheduler_refuses_a_budget_without_room():
    with pytest.raises(ValueError, match="token budget 20"):
        sch.schedule([1, 2, 3, 4, 5], [], 20)
    with pytest.raises(ValueError, match="policy='fifo'"):
        sch.schedule([], [], 64, policy="fifo")


# ---- the engine on the tiny model ---------------------------------------------------

# Three prompts of one length and a longer one (the live state's prompt bound grows when it
# joins); one request needs more decode headroom (its bucket grows too). Few shapes: few compiles.
PROMPTS = [
    "the cat sat on the mat, ok?",
    "a b c d e f g h i j k l m n",
    "Hello there, how are you?? ",
    "one two three four five six seven eight nine ten",
]
NEW = [9, 14, 5, 20]


def _reference(model, policy):
    out = []
    for p, n in zip(PROMPTS, NEW):
        r = kvjax.generate(model, p, policy=policy, max_new_tokens=n, stop_ids=[])
        out.append(r.tokens[0, : r.n_tokens[0]].tolist())
    return out


def _serve(model, policy, order, late, **kw):
    """Submit PROMPTS in `order`; the ones in `late` only after a few steps."""
    eng = Engine(model, policy, rows=2, token_budget=64, **kw)
    handles = {}
    for i in order:
        if i not in late:
            handles[i] = eng.submit(PROMPTS[i], max_tokens=NEW[i], stop_ids=[])
    for _ in range(3):
        eng.step()
    for i in order:
        if i in late:
            handles[i] = eng.submit(PROMPTS[i], max_tokens=NEW[i], stop_ids=[])
    eng.run_until_idle()
    return [handles[i] for i in range(len(PROMPTS))], eng


MIXES = (([0, 1, 2, 3], {3}), ([3, 2, 0, 1], {0, 1}))
COMPRESSED = "snapkv:budget=0.3,window=8+kivi:bits=2,group=16,residual=16"


@pytest.mark.parametrize(
    ("policy", "mixes"),
    [
        ("dense", MIXES[:1]),
        ("snapkv:budget=0.3,window=8", MIXES[1:]),
        pytest.param(COMPRESSED, MIXES, marks=pytest.mark.slow),
    ],
    ids=["dense", "snapkv", "snapkv+kivi"],
)
@pytest.mark.usefixtures("xla_passes_off")  # the tiny model: compile-bound even where `slow`
def test_greedy_requests_equal_generate_alone(tiny_model, policy, mixes):
    """Arrival orders and mixes (two rows, so requests queue, reuse rows and join a running
    batch, which grows its bucket): each request's tokens equal `generate` of it alone."""
    want = _reference(tiny_model, policy)
    for order, late in mixes:
        handles, eng = _serve(tiny_model, policy, order, late)
        assert [h.tokens for h in handles] == want, (order, late)
        assert [h.finish_reason for h in handles] == ["length"] * len(PROMPTS)
        stats = eng.stats
        assert stats["step_tokens_max"] <= 64 and stats["grows"] >= 1
        assert stats["finished_length"] == len(PROMPTS) and stats["running"] == stats["prefilling"] == 0
        if order == MIXES[0][0]:  # requests 0 and 1 (equal lengths) arrive together: one prefill call
            assert stats["prefill_calls"] < stats["prefill_chunks"], stats


def test_sampling_stops_cancel_and_admission(tiny_model):
    eng = Engine(tiny_model, "dense", rows=4, token_budget=64)
    greedy = eng.submit("abc", max_tokens=6, stop_ids=[])
    s1 = eng.submit("abc", max_tokens=6, stop_ids=[], temperature=1.0, top_k=20, top_p=0.9, seed=3)
    s2 = eng.submit("abc", max_tokens=6, stop_ids=[], temperature=1.0, top_k=20, top_p=0.9, seed=3)
    hot = eng.submit("abc", max_tokens=6, stop_ids=[], temperature=5.0, seed=4)
    eng.run_until_idle()
    assert s1.tokens == s2.tokens and len(s1.tokens) == 6  # a seed reproduces its tokens
    assert hot.tokens != greedy.tokens
    # a stop id ends the request with that token counted; a stop string cuts the text
    first = greedy.tokens[2]
    h = eng.submit("abc", max_tokens=6, stop_ids=[first])
    text = tiny_model.tokenizer.decode(greedy.tokens)
    cut = eng.submit("abc", max_tokens=6, stop_ids=[], stop=text[3:5])
    eng.run_until_idle()
    assert h.tokens == greedy.tokens[:3] and h.finish_reason == "stop"
    assert cut.finish_reason == "stop" and cut.text == text[:3]
    # cancellation frees the row at the next step
    long = eng.submit("abc", max_tokens=200, stop_ids=[])
    for _ in range(4):
        eng.step()
    assert eng.stats["running"] == 1
    long.cancel()
    eng.step()
    assert long.done and long.finish_reason == "cancelled" and eng.stats["running"] == 0
    with pytest.raises(ValueError, match="exceeds the model's context"):
        eng.submit("a" * tiny_model.config.max_position, max_tokens=1)


def test_kv_bytes_admission_favours_a_compressed_policy(tiny_model):
    """Under one byte budget (two dense rows) the compressed policy's smaller rows admit more
    requests, and the live state they would reserve stays within the budget (admission only:
    nothing is compiled)."""
    ids = list(range(4, 44))  # 40 tokens: prompt bound 40
    dense = Engine(tiny_model, "dense", rows=8, token_budget=256)
    budget = 2 * dense.row_bytes(40, 16)
    admitted = {}
    for spec in ("dense", "snapkv:budget=0.2,window=8"):
        eng = Engine(tiny_model, spec, rows=8, token_budget=256, max_kv_bytes=budget)
        for _ in range(6):
            eng.submit(ids, max_tokens=2, stop_ids=[])
        admitted[spec] = eng.admit_waiting()
        reserved = eng.reserved_bytes(eng._bucket_with(eng._prefilling))
        assert reserved <= budget and eng.stats["waiting"] == 6 - admitted[spec]
    assert admitted["dense"] == 2 and admitted["snapkv:budget=0.2,window=8"] >= 4, admitted
    with pytest.raises(ValueError, match="max_kv_bytes"):
        Engine(tiny_model, "dense", rows=2, token_budget=64, max_kv_bytes=1000).submit(ids, max_tokens=2)


@pytest.mark.slow
@pytest.mark.usefixtures("xla_passes_off")  # a tiny random model: compile-bound
def test_serve_bench_smoke():
    """benchmarks/serve_bench.py's GPU path on CPU (--smoke): both schedules serve every
    request; under one byte budget KIVI admits more 256-token requests than dense, and SnapKV +
    KIVI more than KIVI."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "serve_bench.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("serve_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--smoke", "--warmup", "1"])
    for run in out["schedules"].values():
        assert run["failures"] == 0 and run["requests"] == 6 and run["ttft"]["n"] == 6
    dense, kivi, both = (a["admitted"] for a in out["admission"])
    assert 1 <= dense < kivi < both
