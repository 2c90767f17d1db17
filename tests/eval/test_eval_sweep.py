"""The sweep runner on a tiny random model with a character tokenizer: resume after an
interruption without redoing finished work, failing cells recorded, plan validation, and a
folder never hands back numbers made with other settings."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from eval_helpers import tiny_model

from kvjax.eval import evaluate, session, sweep, tasks
from kvjax.eval.ppl import _teacher_forced_nll, text_window
from kvjax.eval.sweep import SettingsMismatch
from kvjax.generation import prefill
from kvjax.policies import parse_policy


@pytest.fixture(scope="module")
def tiny(tiny_config, tiny_params):
    return tiny_model(tiny_config, tiny_params)


def test_plan_expands_budgets_and_validates():
    cells = sweep.plan(["passkey", "ppl"], ["dense", "knorm", "snapkv:window=8"], [0.5, 0.2], [400], [0, 1])
    specs = sorted({c.policy for c in cells})
    assert specs == [
        "dense",
        "knorm:budget=0.2",
        "knorm:budget=0.5",
        "snapkv:budget=0.2,window=8,kernel=5",
        "snapkv:budget=0.5,window=8,kernel=5",
    ]
    assert len(cells) == 5 * 2 * 2 and {c.mode for c in cells if c.task == "ppl"} == {"-"}
    with pytest.raises(ValueError, match="unknown task 'haystack'"):
        sweep.plan(["haystack"], ["dense"], [], [400], [0])
    with pytest.raises(ValueError, match="unknown policy 'snapkvv'"):
        sweep.plan(["passkey"], ["snapkvv"], [0.5], [400], [0])
    with pytest.raises(ValueError, match="unknown mode 'outside'"):
        sweep.plan(["passkey"], ["dense"], [0.5], [400], [0], modes=["outside"])
    with pytest.raises(ValueError, match="context=0 must be a positive number"):
        sweep.plan(["passkey"], ["dense"], [], [0], [0])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(trials=0), "trials=0 for every task must be an integer >= 1"),
        (dict(trials={"passkey": -1}), "trials=-1 for passkey"),
        (dict(trials={"ppl": 3}), "trials do not apply to ppl"),
        (dict(trials={"needle": 3}), "trials for unknown task 'needle'"),
        (dict(options={"kv_retrieval": {"pairs": "x"}}), "kv_retrieval option pairs='x' must be an integer"),
        (dict(options={"kv_retrieval": {"depth": 2}}), "task 'kv_retrieval' has no option 'depth'"),
        (dict(options={"kv_retrieval": {"turns": 3}}), r"turns=3 must be in \[1, pairs=2\]"),
        (dict(options={"mix": {"kv_first": 1}}), "mix option kv_first=1 must be true or false"),
        (dict(options={"ppl": {"x": 1}}), "ppl takes no options"),
        (dict(batch_size=0), "batch_size=0 must be an integer >= 1"),
        (dict(haystack="plain words, no people in it. " * 50), "task 'qa' asks about facts stated in the text"),
    ],
)
def test_check_plan_refuses_bad_settings_without_a_model(kwargs, message):
    cells = sweep.plan(["passkey", "qa", "ppl"], ["dense"], [], [400], [0])
    with pytest.raises(ValueError, match=message):
        sweep.check_plan(cells, **kwargs)


@pytest.mark.skipif(importlib.util.find_spec("kvpress") is None, reason="kvpress is not installed")
def test_kvpress_cells_need_a_press():
    cells = sweep.plan(["passkey"], ["dense", "tova"], [0.5], [400], [0], engines=["kvpress"])
    with pytest.raises(ValueError, match="no kvpress press matches 'tova:budget=0.5,on_decode=True'"):
        sweep.check_plan(cells)


def test_sweep_resumes_and_records_errors(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no kvquant calibration for the tiny model
    kvquant = sweep.plan(["passkey"], ["kvquant:bits=4"], [], [400], [0])[0].policy
    cells = sweep.plan(["passkey"], ["dense", "knorm", "kvquant:bits=4"], [0.5], [400], [0])
    calls = []
    real = session.run_session

    def counting(model, pol, *a, **k):
        calls.append(pol.spec())
        again = k.pop("_again", False)
        if len(calls) == 4 and not again:
            raise KeyboardInterrupt  # the process dies in the middle of batch 1
        return real(model, pol, *a, **k)

    monkeypatch.setattr(sweep, "run_session", counting)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(tiny, cells, str(tmp_path), trials=4, batch_size=2, progress=False)
    # batch 0: dense ok, knorm ok, kvquant fails (no calibration) -> error cell; batch 1: dense interrupted
    assert calls == ["dense", "knorm:budget=0.5", kvquant, "dense"]
    first = sweep.read_jsonl(str(tmp_path / "cells.jsonl"))
    assert [r["status"] for r in first] == ["error"] and "no kvquant calibration" in first[0]["error"]
    calls.clear()
    monkeypatch.setattr(sweep, "run_session", lambda *a, **k: counting(*a, **k, _again=True))
    rows = sweep.run_sweep(tiny, cells, str(tmp_path), trials=4, batch_size=2, progress=False)
    assert calls == ["dense", "knorm:budget=0.5"]  # only batch 1 of the two unfinished cells
    assert sweep.summary(rows) == "2 cells finished, 1 failed"
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["policy"] for r in ok) == ["dense", "knorm:budget=0.5"]
    for r in ok:
        assert r["trials"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["kv_bytes"] > 0
        assert r["devices"] == [jax.devices()[0].device_kind]  # where its batches ran
        assert r["settings"]["trials"] == 4 and r["settings"]["batch_size"] == 2
    knorm = next(r for r in ok if r["policy"].startswith("knorm"))
    dense = next(r for r in ok if r["policy"] == "dense")
    assert knorm["kv_bytes"] < 0.6 * dense["kv_bytes"]
    calls.clear()
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=4, batch_size=2, progress=False)
    assert calls == []  # everything finished: nothing is redone (the failed cell neither)
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["policy"] for x in lines)
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=4, batch_size=2, progress=False, force=True)
    assert calls == [kvquant]  # force: only the failed cell again


def _reference_ppl(model, tokens, policy):
    """The perplexity protocol spelled out: prefill half, teacher-force the rest step by step."""
    toks = np.asarray(tokens, np.int32)[None]
    n, half = toks.shape[1], toks.shape[1] // 2
    common = dict(config=model.config, policy=policy, dtype=model.dtype)
    first, state = prefill(
        model.params, jnp.asarray(toks[:, :half]), jnp.asarray([half]), max_new_tokens=n - half, **common
    )
    nll = _teacher_forced_nll(model.params, state, first, jnp.asarray(toks[:, half:]), **common)
    return float(np.exp(float(nll[0]) / (n - half)))


def test_ppl_cells_and_evaluate_match_the_protocol(tiny, tmp_path):
    """The sweep's and evaluate's perplexity (shared capture, chunked feeding) equal the plain protocol."""
    text = " ".join(f"word{i % 37} and more{i % 11}" for i in range(200))
    path = tmp_path / "t.txt"
    path.write_text(text)
    cells = sweep.plan(["ppl"], ["dense", "snapkv:window=8", "h2o"], [0.5], [256], [3])
    rows = sweep.run_sweep(tiny, cells, str(tmp_path / "out"), text=str(path), progress=False)
    window = text_window(tiny.tokenizer, text, 256, 3)
    for r in rows:
        ref = _reference_ppl(tiny, window, parse_policy(r["policy"]))
        assert r["status"] == "ok" and r["ppl"] == pytest.approx(ref, rel=1e-4)
        assert r["devices"] == [jax.devices()[0].device_kind]
    one = evaluate(tiny, "ppl", "snapkv:budget=0.5,window=8", context=256, seed=3, text=str(path))
    assert one["ppl"] == pytest.approx(rows[1]["ppl"], rel=1e-4)  # its own prefill, no shared capture


def test_eval_and_sweep_score_the_same_prompts(tiny, tmp_path, monkeypatch):
    """One task definition: `evaluate` (kvjax eval) and `run_sweep` (kvjax sweep) feed the model
    the token ids of `tasks.make_episodes`'s episodes and score them alike."""
    from kvjax.eval import load_text

    seen = []
    real = session.run_session

    def spy(model, pol, contexts, turns, *a, **k):
        seen.append((contexts, turns))
        return real(model, pol, contexts, turns, *a, **k)

    monkeypatch.setattr(sweep, "run_session", spy)
    one = evaluate(tiny, "kv_retrieval", "knorm:budget=0.5", context=400, trials=3, seed=5, batch_size=3)
    by_eval = list(seen)
    seen.clear()
    cells = sweep.plan(["kv_retrieval"], ["knorm"], [0.5], [400], [5])
    (row,) = sweep.run_sweep(tiny, cells, str(tmp_path), trials=3, batch_size=3, progress=False)
    assert seen == by_eval
    eps = tasks.make_episodes("kv_retrieval", tiny.tokenizer, 400, 3, 5, load_text("kjv-judges"))
    assert by_eval[0][0] == [tiny.tokenizer.encode(e.context) for e in eps]
    assert by_eval[0][1] == [[tiny.tokenizer.encode(p) for p in e.pieces()] for e in eps]
    for k in ("accuracy", "correct", "questions", "samples", "kv_bytes"):
        assert one[k] == row[k], k


def test_episodes_are_woven_into_the_text_not_its_name(tiny, tmp_path, monkeypatch):
    """Regression: the runner once handed the text's *name* ("kjv-judges") to the episode
    generators, so every haystack was that word repeated (and qa found no facts)."""
    from kvjax.eval import load_text

    seen = []
    real = sweep.make_episodes

    def spy(task, tok, context, trials, seed, text, **kw):
        seen.append(text)
        return real(task, tok, context, trials, seed, text, **kw)

    monkeypatch.setattr(sweep, "make_episodes", spy)
    rows = sweep.run_sweep(
        tiny, sweep.plan(["passkey"], ["dense"], [], [400], [0]), str(tmp_path), trials=1, progress=False
    )
    assert rows[0]["status"] == "ok" and seen == [load_text("kjv-judges")]


def test_a_task_that_cannot_be_built_fails_its_cells_and_the_sweep_goes_on(tiny, tmp_path):
    f = tmp_path / "notes.txt"  # one fact in the whole text: no window holds the two qa asks
    f.write_text("And Ehud the son of Gera rose. " + "plain words without any narrative in them at all. " * 200)
    cells = sweep.plan(["qa", "passkey"], ["dense"], [], [400], [0])
    rows = sweep.run_sweep(tiny, cells, str(tmp_path / "out"), trials=1, text=str(f), progress=False)
    by_task = {r["task"]: r for r in rows}
    assert by_task["qa"]["status"] == "error" and "facts" in by_task["qa"]["error"]
    assert by_task["passkey"]["status"] == "ok"


def test_other_settings_never_return_the_old_numbers(tiny, tmp_path):
    """Resuming into a folder with other trials, text content, options, batch size or model
    stops before running anything, naming the setting; force=True runs the cells again and
    replaces their records."""
    text = tmp_path / "story.txt"
    text.write_text("The river ran past the old mill and the miller sang. " * 120)
    out = str(tmp_path / "out")
    cells = sweep.plan(["kv_retrieval"], ["dense"], [], [400], [0])
    base = dict(trials=2, text=str(text), batch_size=2, progress=False)
    (first,) = sweep.run_sweep(tiny, cells, out, **base)
    assert first["status"] == "ok" and first["trials"] == 2

    def refused(model=tiny, **changes):
        with pytest.raises(SettingsMismatch) as e:
            sweep.run_sweep(model, cells, out, **{**base, **changes})
        return str(e.value)

    assert "trials: recorded 2, asked 3" in refused(trials=3)
    assert "batch_size: recorded 2, asked 1" in refused(batch_size=1)
    assert "options: recorded {}, asked {'pairs': 3}" in refused(options={"kv_retrieval": {"pairs": 3}})
    params = jax.tree_util.tree_map(lambda x: x * 1.01, tiny.params)
    assert "model: recorded 'tiny:" in refused(model=tiny_model(tiny.config, params))
    text.write_text("The river ran past the old mill and the miller laughed. " * 120)  # same path, new content
    message = refused()
    assert "text_sha256: recorded" in message and "pass --force" in message
    assert [json.loads(x)["trials"] for x in Path(out, "cells.jsonl").read_text().splitlines()] == [2]
    (again,) = sweep.run_sweep(tiny, cells, out, **{**base, "trials": 3}, force=True)
    assert again["trials"] == 3 and again["settings"]["trials"] == 3
    records = sweep.read_jsonl(str(Path(out, "cells.jsonl")))
    assert len(records) == 1 and records[0]["trials"] == 3  # the old record is gone
    (reused,) = sweep.run_sweep(tiny, cells, out, **{**base, "trials": 3})
    assert reused == again


def test_records_without_settings_are_not_reused(tiny, tmp_path):
    cells = sweep.plan(["passkey"], ["dense"], [], [400], [0])
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=1, progress=False)
    (rec,) = sweep.read_jsonl(str(tmp_path / "cells.jsonl"))
    del rec["settings"]  # as an older kvjax wrote it
    (tmp_path / "cells.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(SettingsMismatch, match="not recorded"):
        sweep.run_sweep(tiny, cells, str(tmp_path), trials=1, progress=False)


def test_cells_of_an_older_task_version_are_redone_and_labelled(tiny, tmp_path, monkeypatch):
    """A record without the task's current version (tasks.TASKS) is not reused on resume,
    and a report shows it in a column of its own ("TASK-vN")."""
    from kvjax.eval import report

    def bump(version):
        monkeypatch.setitem(tasks.TASKS, "passkey", dataclasses.replace(tasks.TASKS["passkey"], version=version))

    cells = sweep.plan(["passkey"], ["dense"], [], [400], [0])
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=2, batch_size=2, progress=False)
    (rec,) = sweep.read_jsonl(str(tmp_path / "cells.jsonl"))
    assert rec["task_version"] == tasks.task_version("passkey") == 1
    calls = []
    real = session.run_session
    monkeypatch.setattr(sweep, "run_session", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=2, batch_size=2, progress=False)
    assert calls == []  # current version: reused
    bump(2)  # the episodes changed
    rows = sweep.run_sweep(tiny, cells, str(tmp_path), trials=2, batch_size=2, progress=False)
    assert calls == [1] and [r["task_version"] for r in rows] == [2]  # redone, the old record ignored
    md = Path(report.write_report(str(tmp_path))).read_text()
    assert "passkey-v1" not in md  # redone with the current version: the old record is dropped
    cells2 = sweep.plan(["passkey"], ["dense"], [], [400], [1])  # a seed that was only run at v2 ...
    sweep.run_sweep(tiny, cells2, str(tmp_path), trials=2, batch_size=2, progress=False)
    bump(3)  # ... and newer episodes again
    md = Path(report.write_report(str(tmp_path))).read_text()
    assert "passkey-v2" in md and "older version of that task's episodes" in md
