"""Train Locret's retaining heads for SmolLM2 on CPU and ship them (the documented run).

    nice .venv/bin/python benchmarks/train_locret.py [--out DIR] [--steps 1500] ...

Data: the two offline texts of kvjax.eval (`kjv-judges`, `pydoc`); from the first 90% of
each text's tokens, `--per-text` evenly spaced windows of `--seq-len` tokens; in each
window the first `--context` tokens are the cache whose importance is learned and the
rest are the later queries that define it (CIS = max scaled attention logit received,
`kvjax.policies.locret_train`). The last 10% of each text gives one held-out window, on
which the script reports the Spearman rank correlation between predicted and true CIS and
the top-10% overlap (per layer and KV head, averaged). Writes the heads with orbax (default:
kvjax/policies/data/locret/<model>, the checkpoint `locret` loads by default) and prints
one JSON line with the settings, the loss curve and the held-out numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kvjax.eval import load_text
from kvjax.loaders import load
from kvjax.policies import locret_train as lt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default=None, help="checkpoint directory (default: the shipped location)")
    ap.add_argument("--per-text", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=1536)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t0 = time.time()
    model = load(args.model)
    texts = ("kjv-judges", "pydoc")
    train_seqs, held_seqs = lt.text_windows(model.tokenizer, [load_text(t) for t in texts], args.seq_len, args.per_text)
    x, y = lt.collect(model, train_seqs, args.context)
    xh, yh = lt.collect(model, held_seqs, args.context)
    t_data = time.time() - t0
    print(f"collected {len(train_seqs)} training and {len(held_seqs)} held-out windows in {t_data:.0f}s", flush=True)
    heads, history = lt.train(
        model.config, x, y, hidden=args.hidden, steps=args.steps, lr=args.lr, window=args.window, seed=args.seed
    )
    t_train = time.time() - t0 - t_data
    rho = lt.rank_correlation(heads, xh, yh)
    top = lt.topk_overlap(heads, xh, yh, 0.1)
    summary = {
        "texts": list(texts),
        "train_windows": len(train_seqs),
        "seq_len": args.seq_len,
        "context": args.context,
        "hidden": args.hidden,
        "steps": args.steps,
        "window": args.window,
        "lr": args.lr,
        "seed": args.seed,
        "history": history,
        "collect_s": round(t_data),
        "train_s": round(t_train),
        "heldout_spearman": float(rho.mean()),
        "heldout_spearman_per_text": [float(r) for r in rho.mean(axis=(1, 2))],
        "heldout_spearman_min_layer": float(rho.mean(axis=(0, 2)).min()),
        "heldout_top10_overlap": float(top.mean()),
    }
    path = lt.save_heads(args.out or lt.default_path(model.config), model.config, heads, summary)
    print(json.dumps({**summary, "path": path}))
    return summary


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
