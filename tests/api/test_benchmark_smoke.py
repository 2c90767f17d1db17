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
