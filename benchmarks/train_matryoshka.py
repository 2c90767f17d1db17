"""Train MatryoshkaKV's projections for SmolLM2 (kvjax.policies.matryoshka_train) and save the checkpoint.

    python benchmarks/train_matryoshka.py --out kvjax/policies/data/matryoshka_MODEL \
        --log benchmarks/results/lowrank_matryoshka_train_smollm2.jsonl [--steps N] [--time-limit S]

PCA initialisation from the first `--pca-tokens` tokens of the training text (Python reference
topics, `pydoc`; the evaluations use KJV Judges), then Matryoshka training on the following
tokens cut into [batch, context] windows: each step samples a key and a value rank per (layer,
KV head) from --ranks, loss = KL to the dense model + next-token cross-entropy, base model frozen.
Stops after --steps or --time-limit seconds, whichever comes first. The log holds one JSON line
per step (loss, kl, ce, wall_s) and a final summary line (steps, wall time, device, settings);
the PCA initialisation is saved beside the checkpoint (--pca-out) for the trained-vs-PCA table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="pydoc")
    ap.add_argument("--out", required=True, help="checkpoint directory")
    ap.add_argument("--pca-out", default="", help="where to save the PCA initialisation (default: none)")
    ap.add_argument("--init", default="", help="start from this checkpoint instead of computing the PCA")
    ap.add_argument("--log", required=True, help="JSONL training log")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=1800.0, help="seconds of training at most")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ranks", default="8,16,24,32,40,48,56,64")
    ap.add_argument("--pca-tokens", type=int, default=2048)
    ap.add_argument("--max-windows", type=int, default=160, help="distinct training windows (cycled)")
    args = ap.parse_args()

    import jax
    import numpy as np

    from kvjax.eval import load_text
    from kvjax.loaders import load
    from kvjax.policies import matryoshka
    from kvjax.policies import matryoshka_train as mt
    from kvjax.quant import calibration

    model = load(args.model, quantized_matmul=False)  # float matmuls: the gradient path
    cfg = model.config
    ranks = tuple(int(r) for r in args.ranks.split(","))
    n_train = min(args.steps, args.max_windows) * args.batch * args.context  # windows are cycled
    ids = calibration._first_tokens(model.tokenizer, load_text(args.text), args.pca_tokens + n_train)
    t0 = time.time()
    if args.init:  # a saved initialisation (e.g. an earlier run's --pca-out)
        init = matryoshka.load_params(cfg, args.init)
    else:
        init = matryoshka.calibrate_pca(calibration.collect(model, ids[: args.pca_tokens]), cfg)
    if args.pca_out and not args.init:
        mt.save(args.pca_out, cfg, init, {"init": "pca", "text": args.text, "tokens": args.pca_tokens})
    rest = np.asarray(ids[args.pca_tokens :], np.int32)
    per = args.batch * args.context
    batches = [rest[i * per : (i + 1) * per].reshape(args.batch, args.context) for i in range(len(rest) // per)]
    log = open(args.log, "w")  # noqa: SIM115 (written line by line until the end of main)

    def write(line: str) -> None:
        log.write(line + "\n")
        log.flush()
        print(line, flush=True)

    arrays, rows = mt.train(
        model, batches, init, steps=args.steps, lr=args.lr, ranks=ranks, log=write, time_limit=args.time_limit
    )
    wall = time.time() - t0
    meta = {
        "init": "pca",
        "trained_steps": len(rows),
        "context": args.context,
        "batch": args.batch,
        "lr": args.lr,
        "ranks": list(ranks),
        "text": args.text,
        "wall_s": round(wall, 1),
        "device": str(jax.devices()[0].device_kind),
    }
    mt.save(args.out, cfg, arrays, meta)
    write(json.dumps({"summary": meta, "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}))


if __name__ == "__main__":
    main()
