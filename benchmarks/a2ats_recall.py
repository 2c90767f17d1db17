"""A^2ATS retrieval recall on SmolLM2, per layer (BENCHMARKS.md, "Retrieval").

Fits A^2ATS codebooks (`kvjax.quant.calibration.a2ats_fit`) on the first `--calib-tokens`
tokens of one text, then, on another text the codebooks have not seen, measures per layer the
recall of the exact top-k keys (k = ceil(3% of the context), per query head, the window and
sink tokens left out of both rankings) by the approximate top-k from the codes, for the last
`--queries` positions of a `--context`-token window (`kvjax.policies.a2ats.recall_at`). Each
configuration is fitted twice: query-aware (Cholesky of the windowed query covariance) and plain
k-means on the same keys (the paper's ablation).

    python benchmarks/a2ats_recall.py [--windows 256,512,1024,2048] [--bits 8] [--sub-dim 8]

Prints one JSON line per (window, bits, sub_dim, query_aware) with the per-layer recall and
its mean.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--calib-text", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-text", default="pydoc")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--queries", type=int, default=16)
    ap.add_argument("--frac", type=float, default=0.03)
    ap.add_argument("--windows", default="1024")
    ap.add_argument("--bits", default="8")
    ap.add_argument("--sub-dim", default="8")
    ap.add_argument("--plain", action="store_true", help="also fit plain k-means (the ablation)")
    args = ap.parse_args()

    import numpy as np

    from kvjax.eval import load_text
    from kvjax.loaders import load
    from kvjax.policies.a2ats import recall_at
    from kvjax.quant import calibration

    model = load(args.model)
    cfg = model.config
    t0 = time.perf_counter()
    calib = calibration.collect(
        model, calibration._first_tokens(model.tokenizer, load_text(args.calib_text), args.calib_tokens), queries=True
    )
    ev = calibration.collect(
        model, calibration._first_tokens(model.tokenizer, load_text(args.eval_text), args.context), queries=True
    )
    print(json.dumps({"collect_s": round(time.perf_counter() - t0, 1)}), flush=True)
    q_post = ev["q_pre"]  # rotated back to post-RoPE below, per layer
    for w in [int(x) for x in args.windows.split(",")]:
        for bits in [int(x) for x in args.bits.split(",")]:
            for sub in [int(x) for x in args.sub_dim.split(",")]:
                for aware in (True, False) if args.plain else (True,):
                    t1 = time.perf_counter()
                    arr = calibration.a2ats_fit(calib, cfg, window=w, sub_dim=sub, bits=bits, query_aware=aware)
                    fit_s = time.perf_counter() - t1
                    rec = []
                    for layer in range(cfg.num_layers):
                        q = _post(q_post[layer][-args.queries :], args.context - args.queries, cfg)
                        rec.append(
                            recall_at(
                                q, ev["k_post"][layer], arr["chol"][layer], arr["codebook"][layer], w, cfg, args.frac
                            )
                        )
                    row = {
                        "window": w,
                        "bits": bits,
                        "sub_dim": sub,
                        "query_aware": aware,
                        "mean_recall": round(float(np.mean(rec)), 4),
                        "recall_per_layer": [round(r, 3) for r in rec],
                        "fit_s": round(fit_s, 1),
                        "artifact_bytes": int(sum(a.nbytes for a in arr.values())),
                    }
                    print(json.dumps(row), flush=True)


def _post(q_pre, start: int, cfg):
    """Pre-RoPE queries [Q, Nq, H] at positions start.. -> post-RoPE."""
    import jax.numpy as jnp
    import numpy as np

    from kvjax.policies.a2ats import rotate

    x = jnp.swapaxes(jnp.asarray(q_pre), 0, 1)  # [Nq, Q, H]
    pos = jnp.broadcast_to(start + jnp.arange(x.shape[1]), x.shape[:2])
    return np.asarray(jnp.swapaxes(rotate(x, pos, cfg), 0, 1))


if __name__ == "__main__":
    main()
