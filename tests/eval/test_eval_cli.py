"""`kvjax eval / sweep / report / calibrate`: bad inputs fail fast (before any model loads)
with one `error: ...` line and exit code 2; failed cells exit 1; a sweep folder never hands
back numbers made with other settings; `calibrate` without --out writes to the user cache,
never into the installed package; the report renders tables and PNG plots from a cells.jsonl."""

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
from eval_helpers import tiny_model
from typer.testing import CliRunner

import kvjax
from kvjax.cli import app, evals
from kvjax.eval import commands, evaluate, sweep
from kvjax.eval.report import method_label, write_report
from kvjax.quant import calibration


def _run(*args):
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output  # stdout and stderr as a terminal shows them


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a command loads a model (every check must come first)."""

    def load_model(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(evals, "load_model", load_model)


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path, tiny_config, tiny_params):
    """Commands load the tiny model; the user cache is a temporary folder."""
    monkeypatch.setattr(evals, "load_model", lambda *a, **k: tiny_model(tiny_config, tiny_params))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


SWEEP = ["sweep", "--tasks", "passkey", "--policies", "dense", "--context", "400", "--out", "x"]
KVPRESS = importlib.util.find_spec("kvpress") is not None


@pytest.mark.parametrize(
    "args,message",
    [
        (["eval", "--task", "haystack"], "unknown task 'haystack'"),
        (["eval", "--task", "passkey", "--policy", "snapkvv"], "unknown policy 'snapkvv'"),
        (["eval", "--task", "passkey", "--text-file", "/nonexistent/t.txt"], "'/nonexistent/t.txt' does not exist"),
        (["eval", "--task", "passkey", "--trials", "0"], "trials=0 for passkey must be an integer >= 1"),
        (["eval", "--task", "passkey", "--mode", "outside"], "unknown mode 'outside'"),
        (["eval", "--task", "passkey", "--context", "0"], "context=0 must be a positive number of tokens"),
        (["eval", "--task", "passkey", "--batch-size", "0"], "batch_size=0 must be an integer >= 1"),
        (["eval", "--task", "passkey", "--option", "qa:turns=1"], "--option names task(s) ['qa'], but --task is"),
        (["eval", "--task", "qa", "--text-file", "pydoc"], "task 'qa' asks about facts stated in the text"),
        (["sweep", "--tasks", "passkey,nope", "--policies", "dense", "--out", "x"], "unknown task 'nope'"),
        (["sweep", "--policies", "dense,tova:budget=2", "--out", "x"], "budget=2.0 must be a fraction"),
        (["sweep", "--policies", "dense", "--budgets", "0.5,half", "--out", "x"], "budget 'half' is not a valid float"),
        (
            ["sweep", "--policies", "dense", "--text-file", "/nonexistent", "--out", "x"],
            "does not exist or is not readable",
        ),
        ([*SWEEP, "--trials", "0"], "trials=0 for every task must be an integer >= 1"),
        ([*SWEEP, "--trials", "5,6"], "trials '5,6' must be one integer or TASK=INTEGER"),
        ([*SWEEP, "--trials", "passkey=0"], "trials=0 for passkey must be an integer >= 1"),
        ([*SWEEP, "--trials", "ppl=3"], "trials do not apply to ppl"),
        ([*SWEEP, "--trials", "needle=3"], "trials for unknown task 'needle'"),
        ([*SWEEP, "--option", "kv_retrieval:pairs=x"], "kv_retrieval option pairs='x' must be an integer"),
        ([*SWEEP, "--option", "kv_retrieval:turns=3"], "turns=3 must be in [1, pairs=2]"),
        ([*SWEEP, "--option", "passkey:pairs=2"], "task 'passkey' has no option 'pairs'"),
        ([*SWEEP, "--batch-size", "0"], "batch_size=0 must be an integer >= 1"),
        (["sweep", "--tasks", "mix", "--policies", "dense", "--text-file", "pydoc", "--out", "x"], "narrative text"),
        pytest.param(
            [*SWEEP, "--engines", "kvpress", "--policies", "tova"],
            "no kvpress press matches 'tova:budget=0.5,on_decode=True'",
            marks=pytest.mark.skipif(not KVPRESS, reason="kvpress is not installed"),
        ),
        (["report", "/nonexistent/dir"], "holds no cells.jsonl"),
        (["calibrate", "--method", "kivi"], "method='kivi' needs no calibration or is unknown"),
        (["calibrate", "--method", "bfp", "--tokens", "1"], "--tokens 1 must be >= 2"),
        (["calibrate", "--method", "bfp", "--text", "/nonexistent.txt"], "neither a built-in text"),
    ],
)
def test_cli_bad_inputs(args, message, no_model):
    code, out = _run(*args)
    assert code == 2 and out.startswith("error: ") and message in out and "Traceback" not in out, out


def test_calibrate_missing_model():
    code, out = _run("calibrate", "--method", "bfp", "--model", "/nonexistent/m.gguf")
    assert code == 2 and "error: model not found: '/nonexistent/m.gguf'" in out, out


def test_unreadable_or_tiny_text_file(tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("only a few words")
    code, out = _run("eval", "--task", "passkey", "--text-file", str(f))
    assert code == 2 and "holds only 4 words" in out


def test_context_longer_than_model(tiny_config, tiny_params):
    model = tiny_model(tiny_config, tiny_params)
    with pytest.raises(ValueError, match="context=1000 exceeds what the model supports"):
        evaluate(model, "passkey", "dense", context=1000)
    with pytest.raises(ValueError, match="context=1000 exceeds what the model supports"):
        sweep.check_contexts(model, sweep.plan(["qa"], ["dense"], [], [1000], [0]))


def test_sweep_cli_refuses_other_settings_and_force_runs_again(tiny_cli):
    """Changing --trials or the --text-file's content into an existing --out never returns the
    old numbers: the sweep stops with one line naming the setting, or --force runs it again."""
    text, out = tiny_cli / "story.txt", str(tiny_cli / "out")
    text.write_text("The river ran past the old mill and the miller sang. " * 100)
    args = ["sweep", "--tasks", "passkey", "--policies", "dense", "--context", "400", "--batch-size", "1"]
    args += ["--text-file", str(text), "--out", out]
    code, log = _run(*args, "--trials", "1")
    assert code == 0 and f"1 cells finished, 0 failed in {out}" in log, log
    code, log = _run(*args, "--trials", "2")
    assert code == 2 and "trials: recorded 1, asked 2" in log and "pass --force" in log and "Traceback" not in log
    assert len([x for x in log.splitlines() if x.startswith("error:")]) == 1
    text.write_text("The river ran past the old mill and the miller laughed. " * 100)
    code, log = _run(*args, "--trials", "1")
    assert code == 2 and "text_sha256: recorded" in log, log
    code, log = _run(*args, "--trials", "2", "--force")
    assert code == 0, log
    (rec,) = sweep.read_jsonl(str(Path(out, "cells.jsonl")))
    assert rec["trials"] == 2 and rec["settings"]["trials"] == 2
    code, log = _run("eval", "--task", "passkey", "--context", "400", "--trials", "2", "--batch-size", "1",
                     "--text-file", str(text), "--json")  # fmt: skip
    assert code == 0 and json.loads(log)["samples"] == rec["samples"], log  # the same cell scores the same


def test_failed_cells_exit_nonzero(tiny_cli):
    """A cell that fails (kvquant without a calibration for the model) exits 1 with one line."""
    code, log = _run(*SWEEP[:-1], str(tiny_cli / "out"), "--policies", "kvquant:bits=4", "--trials", "1")
    assert code == 1 and "0 cells finished, 1 failed" in log and "error: 1 of 1 cells failed" in log, log
    assert "no kvquant calibration" in log and "Traceback" not in log
    code, log = _run("eval", "--task", "passkey", "--policy", "kvquant:bits=4", "--context", "400", "--trials", "1")
    assert code == 1 and "error: passkey with kvquant" in log and "Traceback" not in log, log


def _files(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_calibrate_without_out_writes_to_the_user_cache(tiny_cli, tiny_config):
    """`kvjax calibrate` with no --out leaves the installed package's files byte-identical,
    writes to $XDG_CACHE_HOME/kvjax/calibration/METHOD/MODEL, and policies load it from there."""
    package = Path(kvjax.__file__).parent / "quant" / "data"
    before = _files(package)
    code, log = _run("calibrate", "--method", "bfp", "--text", "kjv-judges", "--tokens", "64")
    assert code == 0, log
    assert _files(package) == before
    path = Path(json.loads(log.splitlines()[-1])["path"])
    assert path == tiny_cli / "cache" / "kvjax" / "calibration" / "bfp" / "tiny" and path.is_dir()
    assert calibration.find("bfp", tiny_config) == str(path)  # the cache before the shipped artifact
    assert calibration.load("bfp", tiny_config)["k_perm"].shape[0] == tiny_config.num_layers
    assert calibration.find("bfp", tiny_config, "/some/dir") == "/some/dir"  # an explicit path first


def test_calibrate_checks_tokens_against_context_and_memory(tiny_cli, monkeypatch):
    code, log = _run("calibrate", "--method", "bfp", "--text", "kjv-judges", "--tokens", "600")
    assert code == 2 and "error: tokens=600 exceeds the model's context (max_position=512)" in log, log
    monkeypatch.setattr(calibration, "available_bytes", lambda: 2**20)
    code, log = _run("calibrate", "--method", "kvquant", "--text", "kjv-judges", "--tokens", "256")
    assert code == 2 and "GiB for kvquant statistics on tiny but 0.0 GiB are free; use fewer --tokens" in log, log


def test_shipped_calibrations_come_after_the_user_cache(tmp_path, monkeypatch, tiny_config):
    import dataclasses

    shipped = next(p for p in (Path(calibration.DATA_DIR) / "bfp").iterdir() if p.is_dir())
    cfg = dataclasses.replace(tiny_config, name=shipped.name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration.find("bfp", cfg) == str(shipped)
    Path(calibration.cache_path("bfp", cfg)).mkdir(parents=True)
    assert calibration.find("bfp", cfg) == calibration.cache_path("bfp", cfg)
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored (XDG base directory rule)
    assert calibration.user_cache_dir() == str(Path.home() / ".cache" / "kvjax")


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
    assert commands.parse_options(["mix:kv_first=true"]) == {"mix": {"kv_first": True}}
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
    assert "| kvjax | kivi(bits=2) | - | 50 (1/3) | 1.9 MB | - | 0.190 |" in md  # no kv_bytes_read recorded: "-"
    assert "| kvjax | kivi(bits=4) | - | 100 (3/3) | 3.1 MB | - | 0.310 |" in md
    assert "Quantized caches (kivi, rtn; 2 and 4 bits): kvjax only, kvpress has no counterpart" in md
    assert "Also kvjax only (no kvpress press): tova." in md
    assert (tmp_path / "passkey_2048_inside.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "cells.jsonl").write_text("\n".join(json.dumps(r) for r in rows if r["engine"] == "kvjax") + "\n")
    assert "kvjax only" not in Path(write_report(str(tmp_path))).read_text()  # no kvpress rows: no note
