"""TriForce's retrieval cache: chunk selection against a numpy re-implementation of the paper's
rule, the prefilled state, decoding on it, bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from kvjax.generation import decode, prefill
from kvjax.generation.resume import pad_rows
from kvjax.policies import PolicyError, TriForceRetrieval, parse_policy
from kvjax.policies.triforce_retrieval import last_query, select_chunks
from kvjax.sampling import Sampler


def numpy_retrieval(k, pos, q_last, budget, chunk):
    """The paper's rule, per (row, KV head), written independently: cut the slots into chunks
    of `chunk`, average each chunk's keys (slots holding a token), score = the group's query
    heads' mean dot product with that average, keep chunk 0 and the best others: ceil(budget /
    chunk) chunks in all for a token budget, ceil(budget x chunks holding tokens) for a fraction. Returns the kept slot indices per (row, head) as sorted lists."""
    b, n, s, _ = k.shape
    g = q_last.shape[1] // n
    out = {}
    for r in range(b):
        for head in range(n):
            scores = {}
            for c in range(0, s, chunk):
                held = [j for j in range(c, min(c + chunk, s)) if pos[r, head, j] >= 0]
                if not held:
                    continue
                mean = np.mean([k[r, head, j] for j in held], axis=0)
                qs = q_last[r, head * g : (head + 1) * g]
                scores[c // chunk] = float(np.mean([q @ mean for q in qs]))
            others = sorted((c for c in scores if c != 0), key=lambda c: -scores[c])
            n_keep = math.ceil(budget / chunk) if budget > 1 else max(1, math.ceil(budget * len(scores) - 1e-6))
            kept = ([0] if 0 in scores else []) + others[: n_keep - 1]
            slots = [j for c in kept for j in range(c * chunk, min(c * chunk + chunk, s)) if pos[r, head, j] >= 0]
            out[(r, head)] = sorted(slots)
    return out


@pytest.mark.parametrize("budget,chunk", [(24, 8), (13, 4), (0.3, 8)])
def test_selection_equals_the_papers_rule(budget, chunk):
    rng = np.random.default_rng(1234)  # fixed tensors
    b, n, s, h, g = 2, 2, 45, 8, 3
    k = rng.normal(size=(b, n, s, h)).astype(np.float32)
    pos = np.tile(np.arange(s, dtype=np.int32), (b, n, 1))
    pos[1, :, 37:] = -1  # a shorter row: its last chunk is partial
    q_last = rng.normal(size=(b, n * g, h)).astype(np.float32)
    idx, valid = select_chunks(jnp.asarray(k), jnp.asarray(pos), jnp.asarray(q_last), budget, chunk)
    idx, valid = np.asarray(idx), np.asarray(valid)
    want = numpy_retrieval(k, pos, q_last, budget, chunk)
    for (r, head), slots in want.items():
        got = idx[r, head][valid[r, head]].tolist()
        assert got == slots, (r, head)
        assert slots[: min(chunk, len(slots))] == list(range(min(chunk, len(slots))))


def test_last_query_picks_each_rows_last_prompt_token():
    q = jnp.arange(2 * 5 * 1 * 1, dtype=jnp.float32).reshape(2, 5, 1, 1)
    q_pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]])
    np.testing.assert_array_equal(np.asarray(last_query(q, q_pos))[:, 0, 0], [4.0, 7.0])


def test_prefilled_state_and_decoding(tiny_params, rng):
    """Rows of 61 and 12 tokens, budget 16: the long row keeps two whole chunks per head (chunk
    0 and one other, which may be the partial last one), the short row keeps all 12; decoding
    appends after them."""
    cfg = tiny_config(num_layers=1)
    params = {
        "params": {k: v for k, v in tiny_params["params"].items() if not k.startswith("layers_") or k == "layers_0"}
    }
    pol = parse_policy("triforce_retrieval:budget=16,chunk=8")
    ids = [rng.integers(3, 97, 61).tolist(), rng.integers(3, 97, 12).tolist()]
    toks, lens = pad_rows(ids, cfg.pad_id, 32)
    kw = dict(config=cfg, policy=pol, max_new_tokens=8, dtype=jnp.float32)
    logits, st = prefill(params, jnp.asarray(toks), jnp.asarray(lens), **kw)
    layer = st.layers[0]
    assert layer.capacity == 16 + 8
    for head in range(cfg.num_kv_heads):
        kept = sorted(p for p in np.asarray(layer.pos[0, head]).tolist() if p >= 0)
        assert len(kept) in (13, 16) and kept[:8] == list(range(8))
        assert all(p // 8 * 8 + j in kept for p in kept for j in range(8) if p // 8 * 8 + j < 61)
        assert sorted(p for p in np.asarray(layer.pos[1, head]).tolist() if p >= 0) == list(range(12))
    kept0 = int((np.asarray(layer.pos[0, 0]) >= 0).sum())
    _, _, st2 = decode(params, st, logits, jax.random.key(0), sampler=Sampler(), stop_ids=(), **kw)
    assert np.asarray(st2.lengths).tolist() == [61 + 7, 12 + 7]
    assert int((np.asarray(st2.layers[0].pos[0, 0]) >= 0).sum()) == kept0 + 7


def test_bad_input(tiny_params):
    with pytest.raises(PolicyError, match="budget=20.5 is above 1, so a token count"):
        TriForceRetrieval(budget=20.5)
    with pytest.raises(PolicyError, match="chunk=0 must be an integer >= 1"):
        TriForceRetrieval(chunk=0)
    with pytest.raises(PolicyError, match=r"budget=0 must be a fraction of the prompt in \(0, 1\] or a token count"):
        TriForceRetrieval(budget=0)
    cfg = tiny_config(num_layers=1)
    params = {
        "params": {k: v for k, v in tiny_params["params"].items() if not k.startswith("layers_") or k == "layers_0"}
    }
    toks, lens = pad_rows([list(range(3, 40))], cfg.pad_id, 16)
    with pytest.raises(PolicyError, match="prefill the prompt whole"):
        prefill(
            params, jnp.asarray(toks), jnp.asarray(lens), config=cfg, policy=TriForceRetrieval(budget=16),
            max_new_tokens=4, prefill_chunk=16,
        )  # fmt: skip
