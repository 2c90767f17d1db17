"""Short prompts and honest bytes, for every registered policy (issue 22, docs/memory.md).

Every policy decides per row from the row's true length, never from the padded bucket: a
5- or 11-token prompt generates, and gives the same greedy tokens alone and in a batch
with a 600-token prompt (whose bucket is 1024). The bytes a state holds are sized from the
batch's bound on true lengths, and no compressed policy holds more than the dense cache
from 1,024 tokens on.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.generation import bucket_length, decode, prefill
from kvjax.models import init_params
from kvjax.policies import REGISTRY, Compose, Dense, PolicyError, parse_policy
from kvjax.policies.eviction import ScoredKV
from kvjax.sampling import Sampler
from kvjax.state import SlotKV, bound_length

#: Every registered policy with its defaults, plus two compositions (selector + store).
SPECS = sorted(REGISTRY) + ["snapkv+kivi", "chunkkv+rtn"]
#: Policies that compress (all but dense).
COMPRESSED = [s for s in SPECS if s != "dense"]
#: Rows up to this many tokens are kept whole with the defaults: the observation or recent
#: window (SnapKV-scored methods 64, KVMerger 32) or sinks + 1 (StreamingLLM, Elastic Cache).
#: (AdaKV's pool is checked through its generated tokens.)
KEPT_WHOLE = {"snapkv": 64, "pyramidkv": 64, "chunkkv": 64, "kvmerger": 32, "streaming": 5, "elastic": 5}
KEPT_WHOLE.update({"snapkv+kivi": 64, "chunkkv+rtn": 64})
MAX_NEW = 4


def build(spec: str, calibrations: dict):
    """The policy of `spec` with defaults; calibrated methods get the tiny model's artifacts."""
    parts = []
    for name in spec.split("+"):
        cls = REGISTRY[name]
        kw = {"calibration": calibrations[name]} if "calibration" in cls.parameters() else {}
        parts.append(cls(**kw))
    return parts[0] if len(parts) == 1 else Compose(*parts)


def _batch(cfg, rows, longest=None):
    width = bucket_length(max(len(r) for r in rows))
    tokens = np.full((len(rows), width), cfg.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
    longest = longest or bound_length(max(len(r) for r in rows), width)
    return jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32), longest


def _generate(params, cfg, pol, rows, longest=None):
    """Greedy tokens [B, MAX_NEW] and the state after prefill (numpy, read before decode)."""
    tokens, lengths, longest = _batch(cfg, rows, longest)
    kw = dict(config=cfg, policy=pol, max_new_tokens=MAX_NEW)
    logits, state = prefill(params, tokens, lengths, longest=longest, **kw)
    kept = jax.tree.map(np.asarray, state)
    out, _, _ = decode(params, state, logits, jax.random.key(0), sampler=Sampler(), stop_ids=(), **kw)
    return np.asarray(out), kept


@pytest.fixture(scope="module")
def generated(tiny_config, tiny_params, tiny_calibrations):
    """spec -> {"alone5", "alone11", "batched": (tokens, state after prefill)}, run once per
    spec. The two lone prompts share one program (bound 12 of the 32-token bucket); the
    batch of 5, 11 and 600 tokens has bound 640 of a 1024-token bucket."""
    rng = np.random.default_rng(22)
    p5, p11, p600 = (rng.integers(3, tiny_config.vocab_size, n).tolist() for n in (5, 11, 600))
    cache = {}

    def get(spec):
        if spec not in cache:
            pol = build(spec, tiny_calibrations)
            cache[spec] = {
                "alone5": _generate(tiny_params, tiny_config, pol, [p5], longest=12),
                "alone11": _generate(tiny_params, tiny_config, pol, [p11], longest=12),
                "batched": _generate(tiny_params, tiny_config, pol, [p5, p11, p600]),
            }
        return cache[spec]

    return get


@pytest.mark.parametrize("spec", SPECS)
def test_short_prompts_generate_the_same_alone_and_batched(spec, generated):
    run = generated(spec)
    batched, st = run["batched"]
    np.testing.assert_array_equal(run["alone5"][0][0], batched[0])
    np.testing.assert_array_equal(run["alone11"][0][0], batched[1])
    for row, (_, alone) in ((0, run["alone5"]), (1, run["alone11"])):
        for layer_alone, layer_batched in zip(alone.layers, st.layers):
            a, b = _kept_positions(layer_alone), _kept_positions(layer_batched)
            if a is not None:
                assert a[0] == b[row], f"row {row} keeps other tokens in the batch"
                n = (5, 11)[row]
                if n <= KEPT_WHOLE.get(spec, 0):
                    assert all(p == list(range(n)) for p in a[0]), f"the {n}-token row is not kept whole"


def _kept_positions(layer):
    """Per row, the sorted positions each KV head keeps (slot caches only, else None)."""
    kv = layer.kv if isinstance(layer, ScoredKV) else layer
    if not isinstance(kv, SlotKV):
        return None
    return [[sorted(p[p >= 0].tolist()) for p in row] for row in np.asarray(kv.pos)]


def test_snapkv_budget_below_the_window_keeps_the_window(tiny_config, tiny_params):
    """100 tokens at budget 0.2 would keep 20, less than the 32-token window: the row keeps
    the window (its 32 newest tokens), not part of it."""
    rng = np.random.default_rng(1)
    tokens, lengths, longest = _batch(tiny_config, [rng.integers(3, 97, 100).tolist()])
    pol = parse_policy("snapkv:budget=0.2,window=32")
    _, state = prefill(tiny_params, tokens, lengths, config=tiny_config, policy=pol, max_new_tokens=1, longest=longest)
    for layer in state.layers:
        for p in np.asarray(layer.pos)[0]:
            assert sorted(p[p >= 0].tolist()) == list(range(68, 100))


def _held_bytes(cfg, pol, n: int, dtype=jnp.bfloat16, max_new: int = 64, read: bool = False) -> int:
    """Bytes the state holds (or, with read=True, one decode step reads) after prefilling one
    n-token prompt, from shapes alone."""
    width = bucket_length(n)
    params = _params_like(cfg)
    fn = functools.partial(
        prefill, config=cfg, policy=pol, max_new_tokens=max_new, dtype=dtype, longest=bound_length(n, width)
    )
    _, state = jax.eval_shape(
        fn, params, jax.ShapeDtypeStruct((1, width), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32)
    )
    if read:
        return state.kv_bytes_read_per_step
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.layers)))


@functools.lru_cache(maxsize=4)
def _params_like(cfg):
    """The model's parameter shapes (no weights allocated)."""
    return jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))


@pytest.mark.parametrize("spec", COMPRESSED)
def test_no_compressed_policy_holds_more_than_dense_from_1024_tokens(spec, tiny_config, tiny_calibrations):
    pol = build(spec, tiny_calibrations)
    # retrieval policies (Quest, A^2ATS) keep every token: they hold about the dense cache and
    # read less of it per decode step
    read = (pol.policies[-1] if isinstance(pol, Compose) else pol).retrieves
    for n in (1024, 1100, 3000):
        held, dense = _held_bytes(tiny_config, pol, n, read=read), _held_bytes(tiny_config, Dense(), n, read=read)
        assert held <= dense, f"{spec} {'reads' if read else 'holds'} {held} bytes at {n} tokens, dense {dense}"


def test_zipcache_saliency_probes_do_not_depend_on_the_batch(tiny_config, tiny_params):
    """ZipCache's probe queries are drawn per row from its true length: a 250-token row (two
    blocks of 100 quantized at prefill, salient tokens chosen by the probes) generates the same
    alone (256 bucket) and next to a 600-token row (1024 bucket)."""
    rng = np.random.default_rng(5)
    p250, p600 = rng.integers(3, 97, 250).tolist(), rng.integers(3, 97, 600).tolist()
    pol = parse_policy("zipcache")
    alone, st_a = _generate(tiny_params, tiny_config, pol, [p250])
    batched, st_b = _generate(tiny_params, tiny_config, pol, [p250, p600])
    np.testing.assert_array_equal(alone[0], batched[0])
    for a, b in zip(st_a.layers, st_b.layers):
        hi_a, hi_b = a.streams[0], b.streams[0]
        np.testing.assert_array_equal(hi_a.count[0], hi_b.count[0])
        for x, y in zip(jax.tree.leaves(hi_a.data), jax.tree.leaves(hi_b.data)):
            n = min(x.shape[2], y.shape[2])
            np.testing.assert_array_equal(x[0, :, :n], y[0, :, :n])


def test_kivi_residual_window_is_sized_to_the_prompt(generated):
    """KIVI (R=128, G=32): a lone 5- or 11-token prompt with 4 new tokens gets a 32-slot
    window, not R + 2G = 192 (room for the G tokens decoded between two deferred flushes); with a
    600-token row in the batch the window is R + 2G again. Nothing of the short rows is quantized
    either way."""
    run = generated("kivi")
    alone, batched = run["alone11"][1].layers[0], run["batched"][1].layers[0]
    assert alone.res_k.shape[2] == 32 and batched.res_k.shape[2] == 192
    np.testing.assert_array_equal(alone.res_len, 11)
    np.testing.assert_array_equal(batched.res_len[:2], [[5, 5], [11, 11]])


def test_byte_fields_of_a_dense_batch(generated, tiny_config):
    """Rows of 5, 11 and 600 tokens: used = 616 slots of K, V and position per layer and
    head (+ the fill counter); dense_bytes_of_seen = 616 tokens of K + V; headroom = the
    rest (decode room, the short rows' empty slots, rounding to 64 slots)."""
    st = generated("dense")["batched"][1]
    cfg = tiny_config
    per_slot = 2 * cfg.head_dim * 4 + 4  # float32 K and V, int32 position
    b = st.byte_stats(cfg)
    assert st.layers[0].k.shape[2] == 704  # 640 (bound) + 4 new tokens, rounded up to 64 slots
    assert b["kv_bytes_held"] == st.nbytes == sum(x.nbytes for x in jax.tree.leaves(st.layers))
    assert b["kv_bytes_used"] == cfg.num_layers * (cfg.num_kv_heads * 616 * per_slot + 4)
    assert b["dense_bytes_of_seen"] == 616 * cfg.kv_bytes_per_token(4)
    assert b["kv_bytes_headroom"] == b["kv_bytes_held"] - b["kv_bytes_used"] > 0


def test_bound_length():
    assert bound_length(11, 32) == 12 and bound_length(5, 32) == 8 and bound_length(32, 32) == 32
    assert bound_length(633, 1024) == 640 and bound_length(600, 1024) == 640 and bound_length(4000, 4096) == 4096
    with pytest.raises(ValueError, match="longest=40 must be an integer in \\[1, width=32\\]"):
        bound_length(40, 32)


def test_adakv_cannot_feed_a_store():
    with pytest.raises(PolicyError, match="cannot compose 'adakv' before 'kivi': adakv keeps its tokens in a layout"):
        parse_policy("adakv+kivi")
