"""The sweep runner on a tiny random model with a character tokenizer: resume after an
interruption without redoing finished work, failing cells recorded, plan validation."""

import json
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.eval import session, sweep


class CharTokenizer:
    """Printable ASCII -> ids 3..96 (newlines become spaces); enough for the tiny model."""

    eos_ids = (2,)

    def encode(self, text):
        return [min(max(ord(c), 32), 125) - 29 for c in text.replace("\n", " ")]

    def decode(self, ids):
        return "".join(chr(int(i) + 29) for i in ids if int(i) >= 3)


@pytest.fixture(scope="module")
def tiny(tiny_config, tiny_params):
    return types.SimpleNamespace(config=tiny_config, params=tiny_params, dtype=jnp.float32, tokenizer=CharTokenizer())


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


def test_sweep_resumes_and_records_errors(tiny, tmp_path, monkeypatch):
    cells = sweep.plan(["passkey"], ["dense", "knorm", "snapkv:window=600"], [0.5], [400], [0])
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
    # batch 0: dense ok, knorm ok, snapkv fails (window > prompt) -> error cell; batch 1: dense interrupted
    assert calls == ["dense", "knorm:budget=0.5", "snapkv:budget=0.5,window=600,kernel=5", "dense"]
    first = sweep.read_jsonl(str(tmp_path / "cells.jsonl"))
    assert [r["status"] for r in first] == ["error"] and "window=600" in first[0]["error"]
    calls.clear()
    monkeypatch.setattr(sweep, "run_session", lambda *a, **k: counting(*a, **k, _again=True))
    rows = sweep.run_sweep(tiny, cells, str(tmp_path), trials=4, batch_size=2, progress=False)
    assert calls == ["dense", "knorm:budget=0.5"]  # only batch 1 of the two unfinished cells
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted(r["policy"] for r in ok) == ["dense", "knorm:budget=0.5"]
    for r in ok:
        assert r["trials"] == 4 and 0.0 <= r["accuracy"] <= 1.0 and r["kv_bytes"] > 0
        assert r["devices"] == [jax.devices()[0].device_kind]  # where its batches ran
    knorm = next(r for r in ok if r["policy"].startswith("knorm"))
    dense = next(r for r in ok if r["policy"] == "dense")
    assert knorm["kv_bytes"] < 0.6 * dense["kv_bytes"]
    calls.clear()
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=4, batch_size=2, progress=False)
    assert calls == []  # everything finished: nothing is redone
    lines = (tmp_path / "cells.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(x)["policy"] for x in lines)


def test_ppl_cells_match_metrics(tiny, tmp_path, monkeypatch):
    """The sweep's perplexity (shared capture, chunked feeding) equals metrics.perplexity."""
    from kvjax.eval.metrics import perplexity
    from kvjax.policies import parse_policy

    text = " ".join(f"word{i % 37} and more{i % 11}" for i in range(200))
    path = tmp_path / "t.txt"
    path.write_text(text)
    cells = sweep.plan(["ppl"], ["dense", "snapkv:window=8", "h2o"], [0.5], [256], [3])
    rows = sweep.run_sweep(tiny, cells, str(tmp_path / "out"), text=str(path), progress=False)
    ids = tiny.tokenizer.encode(text)
    start = int(np.random.default_rng(3).integers(0, len(ids) - 256 + 1))
    for r in rows:
        ref = perplexity(tiny, ids[start : start + 256], parse_policy(r["policy"]))
        assert r["status"] == "ok" and r["ppl"] == pytest.approx(ref["ppl"], rel=1e-4)
        assert r["devices"] == [jax.devices()[0].device_kind]


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
    f = tmp_path / "notes.txt"
    f.write_text("plain words without any narrative facts in them at all. " * 200)
    cells = sweep.plan(["qa", "passkey"], ["dense"], [], [400], [0])
    rows = sweep.run_sweep(tiny, cells, str(tmp_path / "out"), trials=1, text=str(f), progress=False)
    by_task = {r["task"]: r for r in rows}
    assert by_task["qa"]["status"] == "error" and "facts" in by_task["qa"]["error"]
    assert by_task["passkey"]["status"] == "ok"


def test_cells_of_an_older_generator_version_are_redone_and_labelled(tiny, tmp_path, monkeypatch):
    """A record without the task's current generator version (episodes.VERSIONS) is not reused
    on resume, and a report shows it in a column of its own ("TASK-vN")."""
    from kvjax.eval import episodes, report

    cells = sweep.plan(["passkey"], ["dense"], [], [400], [0])
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=2, batch_size=2, progress=False)
    (rec,) = sweep.read_jsonl(str(tmp_path / "cells.jsonl"))
    assert rec["task_version"] == episodes.task_version("passkey") == 1
    calls = []
    real = session.run_session
    monkeypatch.setattr(sweep, "run_session", lambda *a, **k: calls.append(1) or real(*a, **k))
    sweep.run_sweep(tiny, cells, str(tmp_path), trials=2, batch_size=2, progress=False)
    assert calls == []  # current version: reused
    monkeypatch.setitem(episodes.VERSIONS, "passkey", 2)  # the generator changed
    rows = sweep.run_sweep(tiny, cells, str(tmp_path), trials=2, batch_size=2, progress=False)
    assert calls == [1] and [r["task_version"] for r in rows] == [2]  # redone, the old record ignored
    md = Path(report.write_report(str(tmp_path))).read_text()
    assert "passkey-v1" not in md  # redone with the current version: the old record is dropped
    cells2 = sweep.plan(["passkey"], ["dense"], [], [400], [1])  # a seed that was only run at v2 ...
    sweep.run_sweep(tiny, cells2, str(tmp_path), trials=2, batch_size=2, progress=False)
    monkeypatch.setitem(episodes.VERSIONS, "passkey", 3)  # ... and a newer generator again
    md = Path(report.write_report(str(tmp_path))).read_text()
    assert "passkey-v2" in md and "older version of that task's episode generator" in md
