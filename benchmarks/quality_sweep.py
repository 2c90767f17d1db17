"""The quality grids behind BENCHMARKS.md "Quality" and docs/quality/ (SmolLM2, CPU).

    python benchmarks/quality_sweep.py run eviction_4k                # 4k: eviction methods, passkey + perplexity
    python benchmarks/quality_sweep.py run eviction_4k_seed1          # 4k: 10 more passkey trials (seed 1)
    python benchmarks/quality_sweep.py run eviction_4k_merging_seed1  # 4k: merging rows to 20 trials
    python benchmarks/quality_sweep.py run eviction_4k_chunk_seed2    # 4k: 10 more trials, chunk rows + TOVA
    python benchmarks/quality_sweep.py run eviction_4k_kv             # 4k: the same methods on KV retrieval
    python benchmarks/quality_sweep.py run eviction_4k_merging        # 4k: merging and trained methods (own prefills)
    python benchmarks/quality_sweep.py run eviction_4k_merging_more   # 4k: their perplexity, KV retrieval (3 trials)
    python benchmarks/quality_sweep.py run tasks_2k                   # 2k: passkey + KV retrieval, kvjax and kvpress
    python benchmarks/quality_sweep.py run tasks_2k_more              # 2k: prefix_suffix, qa, majority, both engines
    python benchmarks/quality_sweep.py run tasks_4k                   # 4k: passkey, kvjax and kvpress side by side
    python benchmarks/quality_sweep.py run tasks_4k_more              # 4k: the other tasks, both engines
    python benchmarks/quality_sweep.py run mix_2k                     # 2k: the multi-task mix, both engines
    python benchmarks/quality_sweep.py run mix_4k                     # 4k: the multi-task mix, both engines
    python benchmarks/quality_sweep.py run merging_2k                 # 2k: passkey for merging / trained methods
    python benchmarks/quality_sweep.py run merging_4k                 # 4k: the same at 4k
    python benchmarks/quality_sweep.py run quant_2k                   # 2k: quantized caches at 2 / 4 bits (kvjax only)
    python benchmarks/quality_sweep.py run quant_4k                   # 4k: the same, passkey / qa / KV retrieval
    python benchmarks/quality_sweep.py run retrieval_4k               # 4k: quest, shadowkv, offload vs snapkv, question excluded
    python benchmarks/quality_sweep.py status quant_2k                # cells recorded, and the keys of those left
    python benchmarks/quality_sweep.py table eviction_4k              # markdown for BENCHMARKS.md
    python benchmarks/quality_sweep.py report tasks_2k                # docs/quality/tasks_2k_4k: report.md + PNG plots

`run` is `kvjax sweep` with the grid below (resumable: rerun to continue; results in
docs/quality/runs/<out>/cells.jsonl, a grid's `out` defaulting to its name). Records of an
older kvjax carry no settings and are not reused: `run --force` runs those cells again. Policies that
are not registered are skipped with a note, so the same command picks up methods added later.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = (
    "streaming",
    "snapkv",
    "pyramidkv",
    "adakv",
    "tova",
    "knorm",
    "h2o",
    "chunkkv",
    "elastic",
    "kvmerger",
    "locret",
)
# kvpress has a press for these (h2o as ObservedAttention: normalized scores, no recent
# window; TOVA without decode-time eviction, as kvpress's TOVAPress)
PRESSED = (
    "streaming",
    "snapkv",
    "pyramidkv",
    "adakv",
    "tova:on_decode=false",
    "knorm",
    "h2o:recent=0,normalize=true",
    "chunkkv",
)
# chunkkv: the paper's SnapKV-window scorer; chunkkv:scorer=tova chunks TOVA's scores
EVICTION = ("streaming", "snapkv", "pyramidkv", "adakv", "tova", "knorm", "h2o", "chunkkv", "chunkkv:scorer=tova")
MERGING = ("elastic", "kvmerger", "locret")
# the quantized caches at 2 and 4 bits (no budget: one cell per spec); kvpress has no
# quantized-cache press, so these are kvjax-only rows. Each cell runs its own prefill.
QUANTIZERS = ("kivi", "kv4", "kvquant", "rotatekv", "rtn", "bfp", "zipcache")
QUANT = tuple(f"{q}:bits={b}" for q in QUANTIZERS for b in (2, 4))
QUANT_2_FIRST = tuple(f"{q}:bits={b}" for b in (2, 4) for q in QUANTIZERS)
# Sized for a 2-core CPU, where a SmolLM2 prefill of 2k-4k tokens is the expensive step: methods
# whose prompt-time state comes from the shared dense capture are cheap per extra policy; merging
# and trained methods run their own prefill per episode, so they get their own small grids.
# Task variants whose full cache scores >= 90% on SmolLM2 (benchmarks/task_difficulty.py; the
# scores are in BENCHMARKS.md, "Task difficulty"): at 4k one code stated twice; 7 votes, 6 for
# the winner.
TUNED = {"kv_retrieval": {"pairs": 1, "repeat": 2}, "majority": {"votes": 7, "winner": 6}}
TUNED_2K = {"majority": TUNED["majority"]}  # two codes stated once already pass the bar at 2k
GRIDS = {
    "eviction_4k": dict(
        tasks=["passkey", "ppl"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        methods=("dense",) + EVICTION,
        trials={"passkey": 10},
        batch_size=5,
    ),
    # a second seed doubles the eviction grid's passkey trials to 20 (the table sums over seeds)
    "eviction_4k_seed1": dict(
        tasks=["passkey"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        seeds=[1],
        methods=("dense",) + EVICTION,
        trials={"passkey": 10},
        batch_size=5,
        out="eviction_4k",
    ),
    # 10 more passkey trials (seed 2) for the chunk rows and TOVA, beside the 20-trial table
    "eviction_4k_chunk_seed2": dict(
        tasks=["passkey"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        seeds=[2],
        methods=("dense", "tova", "chunkkv", "chunkkv:scorer=tova"),
        trials={"passkey": 10},
        batch_size=5,
        out="eviction_4k_seed2",
    ),
    "eviction_4k_kv": dict(
        tasks=["kv_retrieval"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        methods=("dense",) + EVICTION,
        trials={"kv_retrieval": 10},
        batch_size=5,
        out="eviction_4k",
        options=TUNED,
    ),
    "eviction_4k_merging": dict(
        tasks=["passkey"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        methods=MERGING,
        trials={"passkey": 3},
        batch_size=3,
        out="eviction_4k",
    ),
    # perplexity and KV retrieval (3 trials) for the merging / trained rows
    "eviction_4k_merging_more": dict(
        tasks=["ppl", "kv_retrieval"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        methods=MERGING,
        trials={"kv_retrieval": 3},
        batch_size=3,
        out="eviction_4k",
        options=TUNED,
    ),
    # 17 more trials (seed 1) take the merging / trained rows to 20 (run on a GPU: they prefill per episode)
    "eviction_4k_merging_seed1": dict(
        tasks=["passkey"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        seeds=[1],
        methods=MERGING,
        trials={"passkey": 17},
        batch_size=3,
        out="eviction_4k",
    ),
    "tasks_2k": dict(
        tasks=["passkey", "kv_retrieval"],
        contexts=[2048],
        modes=["inside", "excluded"],
        engines=["kvjax", "kvpress"],
        methods=("dense",) + PRESSED,
        trials=3,
        batch_size=3,
        kvjax_only=("tova",),
        out="tasks_2k_4k",
    ),
    "tasks_2k_more": dict(
        tasks=["prefix_suffix", "qa", "majority"],
        contexts=[2048],
        modes=["inside", "excluded"],
        engines=["kvjax", "kvpress"],
        methods=("dense",) + PRESSED,
        trials=3,
        batch_size=3,
        excluded_tasks=["qa"],
        kvjax_only=("tova",),
        out="tasks_2k_4k",
        options=TUNED_2K,
    ),
    "tasks_4k": dict(
        tasks=["passkey"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax", "kvpress"],
        methods=("dense",) + PRESSED,
        trials=3,
        batch_size=3,
        out="tasks_2k_4k",
    ),
    "tasks_4k_more": dict(
        tasks=["kv_retrieval", "prefix_suffix", "majority", "qa"],
        contexts=[4096],
        modes=["inside", "excluded"],
        engines=["kvjax", "kvpress"],
        methods=("dense",) + PRESSED,
        trials=3,
        batch_size=3,
        excluded_tasks=["qa"],
        kvjax_only=("tova",),
        out="tasks_2k_4k",
        options=TUNED,
    ),
    # the multi-task mix (passkey, KV-retrieval and qa turns over one context), one code
    "mix_2k": dict(
        tasks=["mix"],
        contexts=[2048],
        modes=["inside"],
        engines=["kvjax", "kvpress"],
        methods=("dense",) + PRESSED,
        trials=3,
        batch_size=3,
        kvjax_only=("tova",),
        out="tasks_2k_4k",
        options={"mix": {"pairs": 1}},
    ),
    "mix_4k": dict(
        tasks=["mix"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax", "kvpress"],
        methods=("dense",) + PRESSED,
        trials=3,
        batch_size=3,
        kvjax_only=("tova",),
        out="tasks_2k_4k",
        options={"mix": {"pairs": 1, "repeat": 2, "kv_first": True}},
    ),
    "merging_2k": dict(
        tasks=["passkey"],
        contexts=[2048],
        modes=["inside"],
        engines=["kvjax"],
        methods=MERGING,
        trials=3,
        batch_size=3,
        out="tasks_2k_4k",
    ),
    "merging_4k": dict(
        tasks=["passkey"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        methods=MERGING,
        trials=3,
        batch_size=3,
        out="tasks_2k_4k",
    ),
    # the quantized caches at 2k: the options of tasks_2k / tasks_2k_more / mix_2k; every
    # "inside" cell before the "excluded" ones (mode_first). The question-excluded placement
    # only for ZipCache: it is the one quantizer whose choice (which tokens keep more bits)
    # reads attention scores, so the question's place can change it; the others quantize every
    # token the same way wherever the question is.
    "quant_2k": dict(
        tasks=["passkey", "kv_retrieval", "prefix_suffix", "qa", "majority", "mix"],
        contexts=[2048],
        modes=["inside", "excluded"],
        engines=["kvjax"],
        methods=("dense",) + QUANT,
        trials=3,
        batch_size=3,
        excluded_tasks=["passkey", "kv_retrieval", "qa"],
        excluded_methods=("dense", "zipcache"),
        out="tasks_2k_4k",
        mode_first=True,
        options={**TUNED_2K, "mix": {"pairs": 1}},
    ),
    # ... and at 4k (the options of tasks_4k / tasks_4k_more), 2-bit specs first
    "quant_4k": dict(
        tasks=["passkey", "qa", "kv_retrieval"],
        contexts=[4096],
        modes=["inside"],
        engines=["kvjax"],
        methods=("dense",) + QUANT_2_FIRST,
        trials=3,
        batch_size=3,
        out="tasks_2k_4k",
        options=TUNED,
    ),
    # retrieval / offload against eviction at the same tokens read or kept (512 of 4,096), the
    # question excluded from the compressed prompt (asked after it, as in a multi-turn session)
    "retrieval_4k": dict(
        tasks=["passkey"],
        contexts=[4096],
        modes=["excluded"],
        engines=["kvjax"],
        methods=(
            "dense",
            "quest:budget=512",
            "quest:budget=512,gqa=union",
            "shadowkv:budget=512",
            "offload:topk=8",
            "snapkv:budget=0.125",
        ),
        trials={"passkey": 20},
        batch_size=5,
    ),
}

BUDGETS = [0.5, 0.2, 0.1]


def _out(grid: str) -> str:
    return os.path.join(ROOT, "docs", "quality", "runs", GRIDS[grid].get("out", grid))


def plan_grid(grid: str, engines: list[str] | None = None) -> list:
    """The grid's cells (`kvjax.eval.sweep.Cell`), in the order they run."""
    from kvjax.eval import sweep
    from kvjax.policies import REGISTRY

    g = GRIDS[grid]
    methods = [m for m in g["methods"] if m.split(":")[0] in REGISTRY]
    missing = sorted(set(m.split(":")[0] for m in g["methods"]) - set(REGISTRY))
    if missing:
        print(f"not registered, skipped: {', '.join(missing)}", file=sys.stderr)
    cells = []
    for engine in [e for e in g["engines"] if engines is None or e in engines]:
        extra = [m for m in g.get("kvjax_only", ()) if engine == "kvjax"]  # no kvpress press for these
        cells += sweep.plan(
            g["tasks"], methods + extra, BUDGETS, g["contexts"], g.get("seeds", [0]), g["modes"], [engine]
        )
    if "excluded_tasks" in g:  # the question-excluded placement only for these tasks
        cells = [c for c in cells if c.mode != "excluded" or c.task in g["excluded_tasks"]]
    if "excluded_methods" in g:  # ... and only for these methods
        cells = [c for c in cells if c.mode != "excluded" or c.policy.split(":")[0] in g["excluded_methods"]]
    if g.get("mode_first"):  # every "inside" cell, then the "excluded" ones
        cells.sort(key=lambda c: (c.context, c.mode != "inside", g["tasks"].index(c.task), c.engine))
    else:
        cells.sort(key=lambda c: (c.context, g["tasks"].index(c.task), c.mode, c.engine))  # grid order
    return cells


def status(grid: str, engines: list[str] | None = None, out: str | None = None) -> str:
    """How many of the grid's cells are recorded in its folder, and which are left."""
    from kvjax.eval.sweep import recorded_keys

    cells = plan_grid(grid, engines)
    folder = out or _out(grid)
    done = recorded_keys(folder)
    left = [c.key for c in cells if c.key not in done]
    return "\n".join([f"{grid}: {len(cells) - len(left)} of {len(cells)} cells recorded in {folder}"] + left)


def run(
    grid: str, model_path: str = "smollm2", engines: list[str] | None = None, out: str | None = None, force=False
) -> None:
    from kvjax.eval import kvpress_bridge, sweep
    from kvjax.loaders import load

    g = GRIDS[grid]
    cells = plan_grid(grid, engines)
    model = load(model_path)
    hf = kvpress_bridge.load_hf(model_path) if any(c.engine == "kvpress" for c in cells) else None
    sweep.enable_compilation_cache()
    sweep.run_sweep(
        model,
        cells,
        out or _out(grid),
        trials=g["trials"],
        batch_size=g["batch_size"],
        options=g.get("options"),
        hf=hf,
        force=force,
    )


def table(grid: str) -> str:
    """The eviction table: a row per method and budget; passkey, KV retrieval, perplexity, KV bytes."""
    from kvjax.eval.report import method_label
    from kvjax.eval.sweep import read_jsonl

    rows: dict = {}
    for r in read_jsonl(os.path.join(_out(grid), "cells.jsonl")):  # cells of several seeds add up
        label, budget = method_label(r["policy"])
        prev = rows.setdefault((label, budget), {}).get(r["task"])
        if prev is not None and r["task"] == "ppl":
            r = prev  # one text window is the perplexity
        elif prev is not None and prev["status"] == r["status"] == "ok":
            r = {**r, "correct": prev["correct"] + r["correct"], "questions": prev["questions"] + r["questions"]}
        elif prev is not None and prev["status"] != "ok":
            r = prev  # an error in any seed shows
        rows[(label, budget)][r["task"]] = r
    head = (
        "| method | budget | passkey | KV retrieval | perplexity | KV bytes (MB) | vs dense |\n"
        "|---|---|---|---|---|---|---|"
    )
    dense = rows.get(("dense", None), {}).get("passkey", {}).get("kv_bytes")
    lines = [head]

    def acc(r):
        if r is None:
            return "not run"
        if r["status"] != "ok":
            return "error"
        return f"{r['correct']}/{r['questions']}"

    for (label, budget), t in sorted(rows.items(), key=lambda kv: (kv[0][0] != "dense", kv[0][0], -(kv[0][1] or 1))):
        ppl = t.get("ppl")
        ppl_s = "not run" if ppl is None else (f"{ppl['ppl']:.2f}" if ppl["status"] == "ok" else "error")
        ref = next((x for x in (t.get("passkey"), t.get("kv_retrieval")) if x and x["status"] == "ok"), None)
        kv = f"{ref['kv_bytes'] / 1e6:.1f}" if ref else "-"
        rel = f"{ref['kv_bytes'] / dense:.3f}" if ref and dense else "-"
        b = "-" if budget is None else f"{budget:g}"
        lines.append(
            f"| {label} | {b} | {acc(t.get('passkey'))} | {acc(t.get('kv_retrieval'))} | {ppl_s} | {kv} | {rel} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["run", "status", "table", "report"])
    p.add_argument("grid", choices=sorted(GRIDS))
    p.add_argument("--engines", help="run only these of the grid's engines (comma-separated), e.g. kvjax")
    p.add_argument(
        "--model", default="smollm2", help="the SmolLM2 GGUF by path (e.g. on a machine without the package)"
    )
    p.add_argument(
        "--out",
        help="run: write the cells to this folder instead of the grid's (e.g. beside another "
        "sweep into the grid's folder; append its jsonl files there afterwards)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="run: run again the grid's cells recorded with other settings (or without them) and its failed cells",
    )
    a = p.parse_args()
    if a.cmd == "run":
        run(a.grid, a.model, a.engines.split(",") if a.engines else None, a.out, a.force)
    elif a.cmd == "status":
        print(status(a.grid, a.engines.split(",") if a.engines else None, a.out))
    elif a.cmd == "table":
        print(table(a.grid))
    else:
        from kvjax.eval.report import write_report

        print(write_report(_out(a.grid), os.path.join(ROOT, "docs", "quality", os.path.basename(_out(a.grid)))))


if __name__ == "__main__":
    main()
