"""Full-cache scores of task variants: how the sweeps' task options are chosen (the full cache
must score >= 90% on the model at every tested length, or the task measures the model, not
the cache).

    python benchmarks/task_difficulty.py [--model PATH] [--trials 10] [--out DIR]

Runs the dense policy only, over the variants in VARIANTS (task, context, options), through
`kvjax.eval.sweep.run_sweep` (one output folder per variant under --out, resumable), and prints
a markdown table: task, context, options, correct / questions.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

VARIANTS = [
    ("kv_retrieval", 2048, {}),
    ("kv_retrieval", 4096, {}),
    ("kv_retrieval", 4096, {"repeat": 2}),
    ("kv_retrieval", 4096, {"pairs": 1}),
    ("kv_retrieval", 4096, {"pairs": 1, "repeat": 2}),
    ("majority", 2048, {}),
    ("majority", 2048, {"votes": 5, "winner": 4}),
    ("majority", 2048, {"votes": 3, "winner": 2}),
    ("majority", 4096, {}),
    ("majority", 4096, {"votes": 5, "winner": 4}),
    ("majority", 2048, {"votes": 7, "winner": 6}),
    ("majority", 4096, {"votes": 7, "winner": 6}),
    ("qa", 2048, {}),  # unambiguous facts, answer prefix quoting 6 words more of the sentence
    ("qa", 4096, {}),
    ("qa", 2048, {"quote": 0}),  # answer prefix "X the son of" only
    ("qa", 4096, {"quote": 0}),
    ("qa", 2048, {"mentions": 2}),
    ("qa", 4096, {"mentions": 2}),
    ("mix", 2048, {}),
    ("mix", 4096, {}),
    ("mix", 4096, {"pairs": 1, "repeat": 2}),  # the code asked after the passkey turn
    ("mix", 4096, {"pairs": 1, "repeat": 2, "kv_first": True}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "kvjax_task_difficulty"))
    ap.add_argument("--tasks", nargs="*", help="only these tasks' variants")
    ap.add_argument("--contexts", nargs="*", type=int, help="only these context lengths")
    a = ap.parse_args()
    from kvjax.eval import sweep
    from kvjax.loaders import load

    model = load(a.model)
    rows = []
    for task, context, options in [
        v for v in VARIANTS if (not a.tasks or v[0] in a.tasks) and (not a.contexts or v[1] in a.contexts)
    ]:
        name = f"{task}_{context}_" + "_".join(f"{k}{v}" for k, v in sorted(options.items()))
        cells = sweep.plan([task], ["dense"], [], [context], [0])
        recs = sweep.run_sweep(
            model,
            cells,
            os.path.join(a.out, name),
            trials=a.trials,
            batch_size=5,
            options={task: options},
            progress=False,
        )
        r = recs[0]
        score = f"{r['correct']}/{r['questions']}" if r["status"] == "ok" else r.get("error", "error")
        rows.append({"task": task, "context": context, "options": json.dumps(options), "full cache": score})
        print(rows[-1], flush=True)
    print("| task | context | options | full cache |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['context']} | {r['options']} | {r['full cache']} |")


if __name__ == "__main__":
    main()
