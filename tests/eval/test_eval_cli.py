"""`kvjax eval / sweep / report`: bad inputs fail fast with clear messages; the report
renders tables and PNG plots from a cells.jsonl; spec-list parsing."""

import json
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvjax.cli import app
from kvjax.eval import commands, evaluate, sweep
from kvjax.eval.report import method_label, write_report


def _run(*args):
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output + (res.stderr if hasattr(res, "stderr") and res.stderr else "")


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--task", "haystack"], "unknown task 'haystack'"),
        (["eval", "--task", "passkey", "--policy", "snapkvv"], "unknown policy 'snapkvv'"),
        (["eval", "--task", "passkey", "--text-file", "/nonexistent/t.txt"], "'/nonexistent/t.txt' does not exist"),
        (["sweep", "--tasks", "passkey,nope", "--policies", "dense", "--out", "x"], "unknown task 'nope'"),
        (["sweep", "--policies", "dense,tova:budget=2", "--out", "x"], "budget=2.0 must be a fraction"),
        (["sweep", "--policies", "dense", "--budgets", "0.5,half", "--out", "x"], "budget 'half' is not a valid float"),
        (
            ["sweep", "--policies", "dense", "--text-file", "/nonexistent", "--out", "x"],
            "does not exist or is not readable",
        ),
        (["report", "/nonexistent/dir"], "holds no cells.jsonl"),
    ],
)
def test_cli_bad_inputs(args, message):
    code, out = _run(*args)
    assert code == 2 and message in out, out


def test_unreadable_or_tiny_text_file(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("only a few words")
    code, out = _run("eval", "--task", "passkey", "--text-file", str(f))
    assert code == 2 and "holds only 4 words" in out


def test_context_longer_than_model(tiny_config):
    model = types.SimpleNamespace(config=tiny_config)
    with pytest.raises(ValueError, match="context=1000 exceeds what the model supports"):
        evaluate(model, "passkey", "dense", context=1000)
    with pytest.raises(ValueError, match="context=1000 exceeds what the model supports"):
        sweep.check_inputs(model, sweep.plan(["qa"], ["dense"], [], [1000], [0]), "kjv-judges")


def test_split_specs_and_options():
    assert commands.split_specs("dense,snapkv:budget=0.2,window=32,tova;h2o:recent=0,normalize=true") == [
        "dense",
        "snapkv:budget=0.2,window=32",
        "tova",
        "h2o:recent=0,normalize=true",
    ]
    assert commands.parse_trials("passkey=20,kv_retrieval=10") == {"passkey": 20, "kv_retrieval": 10}
    assert commands.parse_trials("7") == 7
    assert commands.parse_options(["kv_retrieval:pairs=3,turns=2"]) == {"kv_retrieval": {"pairs": 3, "turns": 2}}
    with pytest.raises(ValueError, match="must look like TASK:key=value"):
        commands.parse_options(["pairs=3"])
    assert method_label("snapkv:budget=0.2,window=16,kernel=5") == ("snapkv(window=16)", 0.2)
    assert method_label("dense") == ("dense", None)


def test_report_writes_tables_and_plots(tmp_path):
    rows = []
    for engine in ("kvjax", "kvpress"):
        for b, acc in ((0.5, 0.9), (0.2, 0.6)):
            rows.append(
                dict(
                    engine=engine,
                    task="passkey",
                    policy=f"snapkv:budget={b},window=64,kernel=5",
                    context=2048,
                    seed=0,
                    mode="inside",
                    status="ok",
                    accuracy=acc,
                    correct=int(10 * acc),
                    questions=10,
                    kv_bytes=b * 1e7,
                    dense_kv_bytes=1e7,
                    compression_ratio=b,
                    prefill_s=1.0,
                    decode_s=0.5,
                )
            )
    rows.append(
        dict(
            engine="kvjax",
            task="ppl",
            policy="dense",
            context=2048,
            seed=0,
            mode="-",
            status="ok",
            ppl=12.3,
            kv_bytes=1e7,
            dense_kv_bytes=1e7,
            compression_ratio=1.0,
            prefill_s=1.0,
            decode_s=2.0,
        )
    )
    rows.append(
        dict(
            engine="kvjax",
            task="passkey",
            policy="tova:budget=0.1",
            context=2048,
            seed=0,
            mode="inside",
            status="error",
            error="MemoryError: boom",
        )
    )
    (tmp_path / "cells.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = Path(write_report(str(tmp_path))).read_text()
    assert "| kvpress | snapkv | 0.2 | 60 (6/6)" not in md  # counts are the recorded ones
    assert "| kvjax | snapkv | 0.5 | 90 (9/10) |" in md and "| kvpress | snapkv | 0.2 | 60 (6/10) |" in md
    assert "MemoryError: boom" in md and "12.30" in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["passkey_2048_inside.png", "ppl_2048_na.png"]
    assert all((tmp_path / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_report_labels_and_plots_quantized_caches(tmp_path):
    """A quantized cache (no budget) shows its bit width in the table's method, "-" as
    budget and its measured ratio; the plot draws one line per quantizer through its widths;
    a table with kvpress rows says the quantized rows are kvjax only."""
    from kvjax.eval.report import is_quantized, plot_lines

    assert method_label("kivi:bits=2") == ("kivi(bits=2)", None)  # the default width is shown too
    assert method_label("kivi:bits=4,residual=64") == ("kivi(bits=4,residual=64)", None)
    assert method_label("kivi:bits=4", bits=False) == ("kivi", None)
    assert is_quantized("rtn:bits=2") and not is_quantized("snapkv:budget=0.2") and not is_quantized("dense")

    def cell(engine, policy, ratio, acc):
        return dict(
            engine=engine,
            task="passkey",
            policy=policy,
            context=2048,
            seed=0,
            mode="inside",
            status="ok",
            accuracy=acc,
            correct=int(3 * acc),
            questions=3,
            kv_bytes=ratio * 1e7,
            dense_kv_bytes=1e7,
            compression_ratio=ratio,
            prefill_s=1.0,
            decode_s=0.5,
        )

    rows = [cell(e, "dense", 1.0, 1.0) for e in ("kvjax", "kvpress")]
    rows += [cell(e, f"snapkv:budget={b}", b, b) for e in ("kvjax", "kvpress") for b in (0.5, 0.2)]
    rows += [
        cell("kvjax", "kivi:bits=2", 0.19, 0.5),
        cell("kvjax", "kivi:bits=4", 0.31, 1.0),
        cell("kvjax", "rtn:bits=2", 0.14, 0.0),
        cell("kvjax", "tova:budget=0.2", 0.2, 2 / 3),
    ]
    lines = plot_lines(rows, "passkey")
    assert sorted(lines[("kivi", "kvjax", True)]) == [(0.19, 50.0, 2), (0.31, 100.0, 4)]
    assert sorted(lines[("snapkv", "kvjax", False)]) == [(0.2, 20.0, None), (0.5, 50.0, None)]
    assert ("rtn", "kvjax", True) in lines and not any("bits" in k[0] for k in lines)
    (tmp_path / "cells.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    md = Path(write_report(str(tmp_path))).read_text()
    assert "| kvjax | kivi(bits=2) | - | 50 (1/3) | 1.9 MB | 0.190 |" in md
    assert "| kvjax | kivi(bits=4) | - | 100 (3/3) | 3.1 MB | 0.310 |" in md
    assert "Quantized caches (kivi, rtn; 2 and 4 bits): kvjax only, kvpress has no counterpart" in md
    assert "Also kvjax only (no kvpress press): tova." in md
    assert (tmp_path / "passkey_2048_inside.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "cells.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["engine"] == "kvjax") + "\n")
    assert "kvjax only" not in Path(write_report(str(tmp_path))).read_text()  # no kvpress rows: no note
