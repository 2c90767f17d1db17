"""Quality of the low-rank KV caches (CSKV, MatryoshkaKV) on SmolLM2, the protocol of quant_quality.py.

Perplexity (kvjax.eval protocol: first half of the context prefilled, second half teacher-forced
through decode steps), passkey accuracy (needles spread over the context) and KV bytes per token
(the whole state after a prefill of the context, from `jax.eval_shape`) for CSKV and MatryoshkaKV
at 75 / 50 / 25% of the key and value channels, CSKV-50% with 4-bit coefficients (+kivi:bits=4)
against KIVI-2 at about the same bytes, and the dense cache.

    python benchmarks/lowrank_quality.py run --out results.jsonl [--context 4096] [--trials 20] [--specs ...]
    python benchmarks/lowrank_quality.py table results.jsonl ...
    python benchmarks/lowrank_quality.py reconstruction --asvd DIR --out recon.json

`run` is quant_quality.py's (one JSON line per spec, resumable). Matryoshka rows use the shipped
(trained) projections; pass `matryoshka:...,calibration=DIR` specs for another checkpoint (the
PCA initialisation, `kvjax calibrate --method matryoshka --out DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quant_quality import run  # the shared protocol

FRACTIONS = (0.75, 0.5, 0.25)
HEAD_DIM = 64  # SmolLM2's
DEFAULT_SPECS = (
    ["dense"]
    + [f"cskv:k_density={f},v_density={f}" for f in FRACTIONS]
    + [f"matryoshka:k_rank={round(f * HEAD_DIM)},v_rank={round(f * HEAD_DIM)}" for f in FRACTIONS]
    + ["cskv:k_density=0.5,v_density=0.5+kivi:bits=4", "kivi:bits=2"]
)


def channels(spec: str) -> str:
    """The fraction of channels a spec keeps, as a label."""
    if m := re.search(r"k_density=([\d.]+),v_density=([\d.]+)", spec):
        return f"{float(m.group(1)):.0%}" if m.group(1) == m.group(2) else f"K {m.group(1)}, V {m.group(2)}"
    if m := re.search(r"k_rank=(\d+),v_rank=(\d+)", spec):
        return f"{int(m.group(1)) / HEAD_DIM:.0%}" if m.group(1) == m.group(2) else f"K {m.group(1)}, V {m.group(2)}"
    return "100%"


def render(rows: list[dict]) -> str:
    by = {}
    for r in rows:
        by.setdefault(r["spec"], {}).update(r)
    dense = by.get("dense")
    head = "| method | channels | perplexity | vs dense | passkey | KV bytes/token | vs dense bytes |\n|---|---|---|---|---|---|---|\n"
    lines = []
    for spec, r in by.items():
        ppl = f"{r['ppl']:.3f}" if "ppl" in r else "-"
        rel = f"{100 * (r['ppl'] / dense['ppl'] - 1):+.1f}%" if dense and "ppl" in r and "ppl" in dense else "-"
        pk = f"{r['passkey']}/{r['trials']}" if "passkey" in r else "-"
        rb = f"{r['bytes_per_token'] / dense['bytes_per_token']:.3f}" if dense else "-"
        lines.append(f"| {spec} | {channels(spec)} | {ppl} | {rel} | {pk} | {r['bytes_per_token']:.0f} | {rb} |")
    return head + "\n".join(lines) + "\n"


def reconstruction(args) -> None:
    """CSKV's relative reconstruction error ||X - X B_r^T B_r||^2 / ||X||^2 (pre-RoPE keys, values;
    all layers) of the closed-form and the ASVD bases at 25 / 50 / 75% of the channels, on the
    calibration text (GPL-3, the first 4096 tokens) and a held-out one (pydoc, 2048 tokens)."""
    from kvjax.eval import load_text
    from kvjax.loaders import load
    from kvjax.policies import cskv
    from kvjax.quant import calibration

    model = load(args.model)
    cfg = model.config
    bases = {"svd": cskv.load_bases(cfg, args.svd), "asvd": cskv.load_bases(cfg, args.asvd)}
    out = {}
    for label, text, n in (("calibration", args.calibration_text, 4096), ("held_out", "pydoc", 2048)):
        st = calibration.collect(model, calibration._first_tokens(model.tokenizer, load_text(text), n))
        out[label] = {
            f"{frac:.0%}": {
                f"{kind}_{v}": round(cskv.reconstruction_error(st[x], b[f"{kind}_basis"], cskv.rank_of(frac, cfg)), 4)
                for kind, x in (("k", "k_pre"), ("v", "v"))
                for v, b in bases.items()
            }
            for frac in FRACTIONS
        }
        print(label, json.dumps(out[label]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default="smollm2")
    r.add_argument("--out", required=True)
    r.add_argument("--specs", nargs="+", default=list(DEFAULT_SPECS))
    r.add_argument("--context", type=int, default=4096)
    r.add_argument("--trials", type=int, default=20)
    r.add_argument("--batch", type=int, default=5)
    r.add_argument("--text", default="kjv-judges")
    r.add_argument("--tasks", nargs="+", default=["ppl", "passkey"], choices=["ppl", "passkey"])
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    c = sub.add_parser("reconstruction")
    c.add_argument("--model", default="smollm2")
    c.add_argument("--svd", default="", help="closed-form calibration ('' = the shipped one)")
    c.add_argument("--asvd", required=True, help="ASVD calibration (kvjax calibrate --method cskv --variant asvd)")
    c.add_argument("--calibration-text", default="/usr/share/common-licenses/GPL-3")
    c.add_argument("--out", required=True)
    args = p.parse_args()
    if args.cmd == "run":
        run(args)
    elif args.cmd == "reconstruction":
        reconstruction(args)
    else:
        rows = [json.loads(x) for path in args.results for x in Path(path).read_text().splitlines() if x.strip()]
        print(render(rows))


if __name__ == "__main__":
    main()
