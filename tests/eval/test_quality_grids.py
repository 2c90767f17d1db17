"""The quality grids of benchmarks/quality_sweep.py plan without a model: every spec parses
(unknown names or parameters raise), keys are unique, the placement filters hold, and
`status` counts recorded cells from a cells.jsonl."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "quality_sweep.py"
_spec = importlib.util.spec_from_file_location("quality_sweep", _PATH)
qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qs)


@pytest.mark.parametrize("grid", sorted(qs.GRIDS))
def test_grid_plans_unique_cells_within_its_filters(grid):
    g = qs.GRIDS[grid]
    cells = qs.plan_grid(grid)
    assert cells, grid
    assert len({c.key for c in cells}) == len(cells), f"{grid}: duplicate cells"
    assert {c.engine for c in cells} <= set(g["engines"]) and {c.task for c in cells} <= set(g["tasks"])
    excluded = [c for c in cells if c.mode == "excluded"]
    if "excluded_tasks" in g:
        assert {c.task for c in excluded} <= set(g["excluded_tasks"])
    if "excluded_methods" in g:
        assert {c.policy.split(":")[0] for c in excluded} <= set(g["excluded_methods"])


def test_quantized_grid_excludes_the_question_only_for_zipcache():
    excluded = {c.policy.split(":")[0] for c in qs.plan_grid("quant_2k") if c.mode == "excluded"}
    assert excluded == {"dense", "zipcache"}


def test_status_counts_recorded_cells(tmp_path):
    cells = qs.plan_grid("merging_2k")
    first = cells[0]
    row = {
        "engine": first.engine,
        "task": first.task,
        "policy": first.policy,
        "context": first.context,
        "seed": first.seed,
        "mode": first.mode,
    }
    (tmp_path / "cells.jsonl").write_text(json.dumps(row) + "\n")
    report = qs.status("merging_2k", out=str(tmp_path)).splitlines()
    assert report[0].startswith(f"merging_2k: 1 of {len(cells)} cells recorded")
    assert first.key not in report and report[1:] == [c.key for c in cells[1:]]
