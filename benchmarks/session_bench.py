"""Sessions on SmolLM2 (CPU): 16 questions about one document through one `kvjax.Session`
(one context prefill) vs 16 independent `kvjax.generate` calls (16 prefills of document +
question). Greedy, dense cache unless --policy is given.

    python benchmarks/session_bench.py --tokens 2000 --questions 16 --out benchmarks/results/session_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax

import kvjax
from kvjax.eval.texts import load_text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--new", type=int, default=8, help="max_new_tokens per answer")
    ap.add_argument("--policy", default="dense")
    ap.add_argument("--text", default="kjv-judges")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model = kvjax.load(args.model)
    tok = model.tokenizer
    doc = tok.decode(tok.encode(load_text(args.text))[: args.tokens])
    questions = [f"\nQuestion {i}: who is named in verse {i + 1}?\nAnswer:" for i in range(args.questions)]
    kw = dict(max_new_tokens=args.new, stop_ids=[])

    t0 = time.perf_counter()
    s = kvjax.Session(model, doc, policy=args.policy, max_new_tokens=args.new, max_question_tokens=32)
    asks = [s.ask(q, **kw) for q in questions]
    session_wall = time.perf_counter() - t0
    st = s.stats
    t0 = time.perf_counter()
    alone = [kvjax.generate(model, doc + q, policy=args.policy, **kw) for q in questions]
    generate_wall = time.perf_counter() - t0
    same = sum(a.texts[0] == g.texts[0] for a, g in zip(asks, alone))
    row = {
        "settings": vars(args),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "session": {
            "context_prefills": st["prefills"],
            "prefill_tokens": st["prefill_tokens"],
            "context_prefill_s": round(st["prefill_s"], 2),
            "question_append_s_total": round(st["append_s"], 2),
            "decode_s_total": round(st["decode_s"], 2),
            "compile_s_total": round(st["compile_s"], 2),
            "wall_s": round(session_wall, 1),
        },
        "independent_generates": {
            "prefills": len(alone),
            "prefill_tokens": sum(g.stats["prompt_tokens"] for g in alone),
            "prefill_s_total": round(sum(g.stats["prefill_s"] for g in alone), 2),
            "decode_s_total": round(sum(g.stats["decode_s"] for g in alone), 2),
            "compile_s_total": round(sum(g.stats["compile_s"] for g in alone), 2),
            "wall_s": round(generate_wall, 1),
        },
        "same_answers": f"{same}/{len(questions)}",
    }
    print(json.dumps(row, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(row, f, indent=1)


if __name__ == "__main__":
    main()
