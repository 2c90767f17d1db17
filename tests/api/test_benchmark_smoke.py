"""The end-to-end benchmark's CPU smoke mode: the same prefill + decode timing code the GPU runs,
on a tiny model, so a broken benchmark is found here and not on the lent GPU."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def longctx_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("longctx_bench", BENCH / "longctx_bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop("benchmarks_common", None)


def test_cpu_smoke_rows(longctx_bench, capsys):
    rows = longctx_bench.main(
        ["--device", "cpu", "--steps", "2", "--cases", "dense@2x64,snapkv:budget=0.5+kivi:bits=2@1x128"]
    )
    assert [(r["policy"], r["B"], r["S"]) for r in rows] == [
        ("dense", 2, 64),
        ("snapkv:budget=0.5+kivi:bits=2", 1, 128),
    ]
    for r in rows:
        assert r["decode ms/step"] > 0 and r["prefill s"] > 0 and r["x roofline"] > 0
    assert "| dense | 2 | 64 |" in capsys.readouterr().out


def test_case_parsing(longctx_bench):
    assert longctx_bench.parse_cases("snapkv:budget=0.2,window=32+kivi:bits=2@4x32768,dense@1x8") == [
        ("snapkv:budget=0.2,window=32+kivi:bits=2", 4, 32768),
        ("dense", 1, 8),
    ]
    with pytest.raises(ValueError, match="expected SPEC@BxS"):
        longctx_bench.parse_cases("dense")


def test_cpu_smoke_chunked_prefill_and_hf_floor(longctx_bench):
    """--prefill-chunk (the prompt in 32-token chunks) and --hf (HF transformers at the same
    B x S, torch on the CPU) in one run; the compression overhead column against dense."""
    rows = longctx_bench.main(
        ["--device", "cpu", "--steps", "2", "--cases", "dense@1x64,kivi:bits=2@1x64", "--prefill-chunk", "32", "--hf"]
    )
    assert [r["policy"].split(" ")[0] for r in rows] == ["dense", "kivi:bits=2", "HF-torch"]
    assert rows[0]["prefill chunk"] == rows[1]["prefill chunk"] == 32
    assert rows[0]["prefill x dense"] == 1.0 and rows[1]["prefill x dense"] > 0
    assert rows[2]["B"] == 1 and rows[2]["S"] == 64 and rows[2]["decode ms/step"] > 0
    for r in rows[:2]:
        assert r["decode ms/step"] > 0 and r["KV GB read/step"] > 0 and r["fallbacks"] == 0


def test_cpu_smoke_max_batch_in_a_child_process(longctx_bench, capsys):
    """--max-batch --isolate runs each trial as the GPU does, in a child process that prints its
    row as JSON (here the tiny model, batch 1 = the limit)."""
    rows = longctx_bench.main(
        ["--device", "cpu", "--isolate", "--max-batch", "--policies", "dense", "--max-batch-context", "64",
         "--max-batch-limit", "1"]
    )  # fmt: skip
    assert rows == [{"policy": "dense", "S": 64, "max batch": 1, "first failing batch": None, "trials": "1+"}]
    out = capsys.readouterr().out
    assert '"decode ms/step"' in out  # the child's row, passed through
    assert "| dense | 64 | 1 |" in out


@pytest.mark.parametrize(
    "largest, limit, tolerance, want_trials",
    [
        (5, 256, 0.0, [1, 2, 4, 8, 6, 5]),  # double until 8 fails, bisect 4..8
        (0, 256, 0.0, [1]),  # nothing fits
        (300, 256, 0.0, [1, 2, 4, 8, 16, 32, 64, 128, 256]),  # everything up to the limit fits
        (200, 256, 0.0, [1, 2, 4, 8, 16, 32, 64, 128, 256, 192, 224, 208, 200, 204, 202, 201]),
        (200, 256, 0.125, [1, 2, 4, 8, 16, 32, 64, 128, 256, 192, 224, 208]),  # within 1/8 of 192
        (6, 6, 0.0, [1, 2, 4, 6]),  # a limit that is no power of two is tried itself
    ],
)
def test_largest_batch_search(longctx_bench, largest, limit, tolerance, want_trials):
    best, fail, trials = longctx_bench.largest_batch(lambda b: b <= largest, limit, tolerance)
    assert [b for b, _ in trials] == want_trials
    assert all(ok == (b <= largest) for b, ok in trials)
    if largest >= limit:
        assert (best, fail) == (limit, None)
    elif tolerance == 0:
        assert (best, fail) == (largest, largest + 1 if largest else 1)
    else:
        assert best <= largest < fail and fail - best <= tolerance * best


def test_largest_batch_passes_other_errors(longctx_bench):
    def fits(b):
        if b == 4:
            raise RuntimeError("INTERNAL: something else")
        return True

    with pytest.raises(RuntimeError, match="something else"):
        longctx_bench.largest_batch(fits, 64)


def test_out_of_memory_messages(longctx_bench):
    assert longctx_bench.is_out_of_memory(
        "XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate 66035122176 bytes."
    )
    assert longctx_bench.is_out_of_memory("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert not longctx_bench.is_out_of_memory("ValueError: context 100 must be a multiple of --prefill-chunk 64")


def test_default_policies_parse(longctx_bench):
    """Every policy of the default GPU tables is a valid spec; policy lists split on specs."""
    from kvjax.policies import parse_policy

    cases = longctx_bench.parse_cases(longctx_bench.GPU_CASES) + longctx_bench.parse_cases(longctx_bench.GPU_LONG_CASES)
    for spec in {c[0] for c in cases}:
        parse_policy(spec)
    assert {"quest", "shadowkv", "offload"} <= {c[0] for c in cases}
    assert longctx_bench.parse_policies("dense,snapkv:budget=0.2,window=32+kivi:bits=2,quest") == [
        "dense",
        "snapkv:budget=0.2,window=32+kivi:bits=2",
        "quest",
    ]
