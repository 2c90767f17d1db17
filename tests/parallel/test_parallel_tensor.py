"""Tensor parallelism on fake CPU devices (one child process, tests/parallel/parallel_child.py).

Tiny random Llama, Qwen3 (q/k norms) and Gemma 3 (local and global layers, sandwich norms,
GeGLU) models with 8 query and 4 KV heads:
- tensor=4, and tensor=2 x seq=2 (the ring), give one device's greedy tokens, dense and with
  SnapKV + KIVI-2 (Gemma 3: SnapKV alone; KIVI refuses models with sliding-window layers);
  with key-norm eviction + KIVI-2 on the ring, tensor=2 x seq=2 gives the ring alone's tokens
  (each ring shard keeps its own budget, so one device is not the reference there);
- each device holds 1/4 of the parameters under tensor=4 (only the norms are replicated);
- the compiled decode on the 2-D mesh gathers nothing but the logits: no all-gather,
  all-to-all or collective-permute of the KV cache, whose leaves stay sharded by KV head
  (and by ring shard along the slots).
"""

from __future__ import annotations

import pytest
from test_parallel_ring import run_child

pytestmark = pytest.mark.slow  # one child process, ~90 s of CPU


@pytest.fixture(scope="module")
def tp():
    return run_child("tensor", 8)


def test_tensor_parallel_generates_like_one_device(tp):
    assert len(tp["runs"]) == 7
    for name, r in tp["runs"].items():
        assert r["tokens"] == r["ref"], (name, r)
    runs = tp["runs"]
    # the compressed runs really hold less than the dense ones
    assert runs["llama/tensor4/snapkv:budget=0.2+kivi:bits=2"]["kv_bytes"] < runs["llama/tensor4/dense"]["kv_bytes"]


def test_each_device_holds_a_quarter_of_the_parameters(tp):
    b = tp["bytes"]
    assert b["replicated"] <= 0.01 * b["total"], b  # norms only
    assert b["device0"] == (b["total"] - b["replicated"]) // 4 + b["replicated"], b


def test_compiled_decode_never_gathers_the_cache(tp):
    hlo = tp["hlo"]
    assert hlo["all-gather"] == [f"f32[2,{tp['vocab']}]"], hlo  # the logits, once per step
    assert hlo["all-to-all"] == [] and hlo["collective-permute"] == [], hlo
    for shape, spec in hlo["state"]:
        # [B, N, S, ...] leaves: KV heads over "tensor", slots over the ring; counters one per shard
        assert (len(shape) >= 3 and spec[1] == "tensor" and spec[2] == "seq") or spec[0] in (
            "seq",
            ["seq", "tensor"],
        ), (
            shape,
            spec,
        )
