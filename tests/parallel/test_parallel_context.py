"""Context-parallel prefill + decode of the whole model on 4 fake CPU devices.

Child process (tests/parallel_child.py) with 4 devices: a random Llama whose weights are
large enough that attention steers the tokens; prompts of two rows with ragged lengths.
- dense (zigzag, striped; ring blocks through `attend`): logits and greedy tokens equal
  the single-device `kvjax.generate` run;
- KIVI-2 on the sharded state (zigzag schedule, prefix kernel), and key-norm eviction
  (50% kept per shard) followed by KIVI-2: prefill logits equal the exact single-device
  ones (both prefill in full precision), and decoding equals a dense decode over exactly
  the tokens the shards hold (kept, dequantized), i.e. the LSE merge across shards
  attends to the whole sharded, compressed cache without gathering it.
The state's slot arrays come out sharded along S over the `seq` mesh axis.
SmolLM2 (slow): greedy tokens of context-parallel generate on 4 devices equal one device's.
"""

from __future__ import annotations

import pytest
from test_parallel_ring import run_child

pytestmark = pytest.mark.slow  # one child process: ~20 s on an idle 2-core machine


@pytest.fixture(scope="module")
def ctx():
    # a tiny model compiled once per policy: the child compiles without XLA's optimisation
    # passes, as the in-process fast tests do (conftest.py); the SmolLM2 child keeps them
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
        return run_child("context", 4)


@pytest.mark.parametrize("run", ["dense", "dense_striped", "kivi2_kernel", "knorm_kivi2"])
def test_context_parallel_matches_one_device(ctx, run):
    r = ctx[run]
    msg = f"{run} seed={ctx['seed']} lengths={ctx['lengths']}: {r}"
    assert r["logits"] <= 1e-4 * max(1.0, r["logits_scale"]), msg
    assert r["tokens"] == r["ref_tokens"], msg


@pytest.mark.parametrize("run", ["dense", "kivi2_kernel", "knorm_kivi2"])
def test_state_is_sharded_along_slots(ctx, run):
    leaves = ctx[run]["sharded"]  # [ndim, mesh axis of dim 2, mesh axis of dim 0] per leaf
    counters = [x for x in leaves if x[2] == "seq"]  # rank < 3 per shard (fill, counts): one entry each
    slots = [x for x in leaves if x[2] != "seq"]  # [B, N, S, ...]: k, v, pos, codes, scales, residual
    assert slots and all(x[0] >= 3 and x[1] == "seq" for x in slots), leaves
    assert all(x[0] <= 3 for x in counters), leaves


def test_eviction_shrinks_the_sharded_quantized_state(ctx):
    # (32 prompt tokens per shard: a KIVI state is then larger than dense, because every shard
    # keeps its own full-precision residual window; evicting half first must still shrink it.)
    assert ctx["knorm_kivi2"]["bytes"] < ctx["kivi2_kernel"]["bytes"], ctx


def test_smollm2_greedy_tokens_equal_one_device():
    r = run_child("smollm2", 4)
    assert r["many"] == r["one"], r
