"""ShadowKV's motivating observation on SmolLM2: pre-RoPE keys are low-rank, post-RoPE keys less so.

For each layer, the keys of all KV heads side by side ([T, N*H], 192 channels on SmolLM2) of a
`--tokens`-token text, before and after RoPE: the share of their squared Frobenius norm (the
"energy") the top r singular directions capture, for r in `--ranks` (BENCHMARKS.md, "ShadowKV").

    python benchmarks/shadowkv_spectrum.py [--text kjv-judges] [--tokens 4096] [--ranks 16,32,48,64,96]

Prints one JSON line per (text, kind) with the mean and the minimum over layers at each rank,
and the smallest rank reaching 90% / 95% / 99% of the energy in every layer.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="kjv-judges,pydoc")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ranks", default="16,32,48,64,96")
    args = ap.parse_args()

    import numpy as np

    from kvjax.eval import load_text
    from kvjax.loaders import load
    from kvjax.quant import calibration

    model = load(args.model)
    ranks = [int(r) for r in args.ranks.split(",")]
    for text in args.text.split(","):
        t0 = time.perf_counter()
        keys = calibration.collect(model, calibration._first_tokens(model.tokenizer, load_text(text), args.tokens))
        for kind in ("k_pre", "k_post"):
            x = np.asarray(keys[kind], np.float64)  # [L, T, N, H]
            layers, t, n, h = x.shape
            energy = []
            for layer in range(layers):
                s = np.linalg.svd(x[layer].reshape(t, n * h), compute_uv=False)
                e = np.cumsum(s**2) / np.sum(s**2)
                energy.append(e)
            energy = np.stack(energy)  # [L, N*H]
            need = {
                f"rank_for_{int(p * 100)}": int(max(np.searchsorted(e, p) + 1 for e in energy))
                for p in (0.9, 0.95, 0.99)
            }
            row = {
                "text": text,
                "tokens": t,
                "kind": kind,
                "channels": n * h,
                "mean": {r: round(float(energy[:, r - 1].mean()), 4) for r in ranks},
                "min": {r: round(float(energy[:, r - 1].min()), 4) for r in ranks},
                **need,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
