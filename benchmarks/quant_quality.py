"""Quality of the quantized KV caches on SmolLM2 at 4k context (BENCHMARKS.md, "Quantized caches").

For every method at 2, 3 and 4 bits (+ naive round-to-nearest rows and the dense cache):
perplexity (kvjax.eval protocol: first half prefilled and quantized, second half
teacher-forced through decode steps), passkey accuracy (kvjax.eval tasks, needles spread
over the context) and KV bytes per token (the whole state after a 4096-token prefill:
codes, scales, positions, residual window, extras; from `jax.eval_shape`, no compute).

    python benchmarks/quant_quality.py run --out results.jsonl [--model smollm2] [--specs ...]
    python benchmarks/quant_quality.py table results.jsonl ... [--write BENCHMARKS.md]

`run` appends one JSON line per spec (so several processes can share a GPU and runs can
resume); `table` renders the markdown table into the "Quantization" section.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

METHODS = ("kivi", "kvquant", "zipcache", "rotatekv", "bfp", "kv4")
DEFAULT_SPECS = ["dense"] + [f"rtn:bits={b}" for b in (2, 3, 4)] + [f"{m}:bits={b}" for m in METHODS for b in (2, 3, 4)]


def bytes_per_token(model, policy, context: int) -> float:
    """State bytes after a `context`-token prefill (no decode headroom) / context."""
    import jax
    import jax.numpy as jnp

    from kvjax.generation import prefill

    toks = jax.ShapeDtypeStruct((1, context), jnp.int32)
    lens = jax.ShapeDtypeStruct((1,), jnp.int32)
    shapes = jax.eval_shape(
        lambda t, l: (
            prefill(model.params, t, l, config=model.config, policy=policy, max_new_tokens=0, dtype=model.dtype)[
                1
            ].layers
        ),
        toks,
        lens,
    )
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes)) / context


def run(args) -> None:
    from kvjax.eval import check, evaluate
    from kvjax.loaders import load
    from kvjax.policies import parse_policy

    model = load(args.model)
    done = set()
    if os.path.exists(args.out):
        with open(args.out) as f:
            done = {json.loads(line)["spec"] for line in f if line.strip()}
    for spec in args.specs:
        if spec in done:
            continue
        pol = parse_policy(spec)
        row = {
            "spec": spec,
            "context": args.context,
            "text": args.text,
            "bytes_per_token": bytes_per_token(model, pol, args.context),
        }
        t0 = time.time()
        if "ppl" in args.tasks:
            row["ppl"] = evaluate(model, "ppl", pol, context=args.context, text=args.text)["ppl"]
        t1 = time.time()
        if "passkey" in args.tasks:
            pk = evaluate(
                model, "passkey", pol, context=args.context, trials=args.trials, text=args.text, batch_size=args.batch
            )
            row.update(
                passkey=pk["correct"],
                trials=pk["trials"],
                misses=[s for s in pk["samples"] if not check(s["outputs"][0], s["answers"][0])][:3],
            )
        row.update(ppl_s=t1 - t0, passkey_s=time.time() - t1)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "misses"}), flush=True)


def render(rows: list[dict], main_text: str = "kjv-judges") -> str:
    """Markdown table; passkey-only rows on another haystack become an extra column."""
    by, extra = {}, {}
    for r in rows:
        if "ppl" in r or r.get("text") == main_text:
            by.setdefault(r["spec"], {}).update(r)
        else:
            extra.setdefault(r["spec"], {})[r["text"]] = f"{r['passkey']}/{r['trials']}"
    texts = sorted({t for e in extra.values() for t in e})
    dense = by.get("dense")
    head = (
        "| method | bits | perplexity | vs dense | passkey | "
        + "".join(f"passkey ({t}) | " for t in texts)
        + "KV bytes/token | vs dense bytes |\n|---|---|---|---|---|"
        + "---|" * len(texts)
        + "---|---|\n"
    )
    lines = []
    order = ["dense"] + [f"rtn:bits={b}" for b in (4, 3, 2)] + [f"{m}:bits={b}" for m in METHODS for b in (4, 3, 2)]
    for spec in order + sorted(set(by) - set(order)):
        r = by.get(spec)
        if r is None:
            continue
        name, _, args = spec.partition(":")
        bits = re.search(r"(?<![a-z_])bits=(\d+)", args)
        rel = f"{100 * (r['ppl'] / dense['ppl'] - 1):+.1f}%" if dense else "-"
        rb = f"{r['bytes_per_token'] / dense['bytes_per_token']:.3f}" if dense else "-"
        extra = re.sub(r"(?<![a-z_])bits=\d+,?", "", args).strip(",")
        label = name + (f" ({extra})" if extra else "")
        pk = "".join(f"{extra.get(spec, {}).get(t, '-')} | " for t in texts)
        lines.append(
            f"| {label} | {bits.group(1) if bits else '-'} | {r['ppl']:.3f} | {rel} | "
            f"{r['passkey']}/{r['trials']} | {pk}{r['bytes_per_token']:.0f} | {rb} |"
        )
    return head + "\n".join(lines) + "\n"


def table(args) -> None:
    rows = [json.loads(line) for path in args.results for line in Path(path).read_text().splitlines() if line.strip()]
    md = render(rows)
    print(md)
    if args.write:
        start, end = "<!-- quant-table:start -->", "<!-- quant-table:end -->"
        text = Path(args.write).read_text() if os.path.exists(args.write) else ""
        if start not in text:
            sys.exit(f"{args.write} has no {start} ... {end} markers")
        a, b = text.index(start) + len(start), text.index(end)
        Path(args.write).write_text(text[:a] + "\n" + md + text[b:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2")
    r.add_argument("--out", required=True)
    r.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    r.add_argument("--context", type=int, default=4096)
    r.add_argument("--trials", type=int, default=10)
    r.add_argument("--batch", type=int, default=5)
    r.add_argument("--text", default="kjv-judges")
    r.add_argument("--tasks", nargs="+", default=["ppl", "passkey"], choices=["ppl", "passkey"])
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    t.add_argument("--write", default=None)
    args = p.parse_args()
    run(args) if args.cmd == "run" else table(args)


if __name__ == "__main__":
    main()
