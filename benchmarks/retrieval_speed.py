"""Decode speed of the retrieval policies against the dense cache (BENCHMARKS.md, Retrieval).

One prompt of about `--context` tokens (the kjv-judges text), `kvjax.generate` with each policy,
`--new` greedy tokens; prints one JSON line per policy with the decode tokens/s (compilation
excluded: a first call compiles, the second is timed), the KV bytes held and the bytes one decode
step reads (`KVState.kv_bytes_read_per_step`).

    python benchmarks/retrieval_speed.py --context 8192 --policies dense,quest:budget=0.125
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--policies", default="dense,quest:budget=0.125")
    ap.add_argument("--implementation", default=None)
    args = ap.parse_args()

    import jax

    import kvjax
    from kvjax.eval import load_text

    model = kvjax.load(args.model)
    ids = model.tokenizer.encode(load_text("kjv-judges"))[: args.context - args.new - 8]
    prompt = model.tokenizer.decode(ids)
    for spec in args.policies.split(","):
        kw = dict(policy=spec, max_new_tokens=args.new, stop_ids=[], implementation=args.implementation)
        kvjax.generate(model, [prompt], **kw)  # compiles
        out = kvjax.generate(model, [prompt], **kw)
        s = out.stats
        row = {
            "policy": s["policy"],
            "prompt_tokens": s["prompt_tokens"],
            "decode_tokens_per_s": round(s["decode_tokens_per_s"], 2),
            "prefill_s": round(s["prefill_s"], 1),
            "kv_bytes_held": s["kv_bytes_held"],
            "kv_bytes_read_per_step": s["kv_bytes_read_per_step"],
            "device": jax.devices()[0].device_kind,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
