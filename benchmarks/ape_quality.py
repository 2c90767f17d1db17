"""APE on SmolLM2 (CPU): retrieval over several passages, encoded sequentially, in parallel
(naive: T = S = 1) and with APE (T = S = 0.9).

Each trial builds `--passages` windows of `--passage-tokens` tokens of a text (KJV Judges by
default). `--task passkey` hides "The pass key is NNNNN. Remember it. NNNNN is the pass key." at
a random depth of one passage (trial t: passage t mod k) and asks for the key; `--task kv` puts
three "The code for WORD is NNNN." lines in every passage (one per third) and asks for the code
of one word of passage t mod k. The same token ids go to all three encodings:

- sequential: prefix + passages + query as one prompt (`kvjax.ape` with the passages as one
  context at T = S = 1, which is sequential encoding; it must fit the model's positions);
- parallel:   `kvjax.ape(..., temperature=1, scale=1)` (each passage at the same positions,
  plain attention over the merged cache);
- ape:        `kvjax.ape(...)` with the default T = S = 0.9.

    python benchmarks/ape_quality.py --trials 10 --passages 4 --passage-tokens 1500 \\
        --out benchmarks/results/ape_quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import kvjax
from kvjax.eval.tasks import check
from kvjax.eval.texts import load_text

PREFIX = "Read the passages below. One of them hides a pass key.\n\n"
WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "piano", "garden", "silver", "candle", "forest", "mirror",
    "rocket", "pepper", "violet", "harbor", "castle", "meadow", "thunder", "lantern", "falcon", "copper",
)  # fmt: skip
KV_PREFIX = "Read the passages below. Some lines give the code for a word.\n\n"
QUERY = "\n\nWhat is the pass key? Answer with the five-digit number only.\nAnswer: The pass key is"


def _insert(passage: list[int], line: list[int], at: int, n: int) -> list[int]:
    return passage[:at] + line + passage[at : n - len(line)]


def trial(tok, text_ids, k, n, seed, task="passkey"):
    """(answer, passages, query ids, passage holding the answer, its relative depth)."""
    rng = np.random.default_rng(seed)
    key = str(int(rng.integers(10000, 100000)))
    starts = rng.choice(len(text_ids) - n, size=k, replace=False)
    passages = [list(text_ids[s : s + n]) for s in starts]
    j = seed % k
    if task == "passkey":
        needle = tok.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
        cut = int(rng.integers(0, n - len(needle)))
        passages[j] = _insert(passages[j], needle, cut, n)
        return key, passages, tok.encode(QUERY), j, cut / n
    # kv: three "The code for WORD is NNNN." lines in every passage; ask for one of them
    words = rng.choice(len(WORDS), size=3 * k, replace=False)
    codes = rng.integers(1000, 10000, size=3 * k)
    asked = 3 * j + int(rng.integers(0, 3))
    depth = 0.0
    for p in range(k):
        for i in sorted(range(3), reverse=True):
            w = 3 * p + i
            line = tok.encode(f"\nThe code for {WORDS[words[w]]} is {codes[w]}.\n")
            cut = int(rng.integers(i * n // 3, (i + 1) * n // 3 - len(line)))
            passages[p] = _insert(passages[p], line, cut, n)
            depth = cut / n if w == asked else depth
    word = WORDS[words[asked]]
    query = tok.encode(
        f"\n\nWhat is the code for {word}? Answer with the four-digit number only.\nAnswer: The code for {word} is"
    )
    return str(codes[asked]), passages, query, j, depth


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--passages", type=int, default=4)
    ap.add_argument("--passage-tokens", type=int, default=1500)
    ap.add_argument("--task", choices=("passkey", "kv"), default="passkey")
    ap.add_argument("--text", default="kjv-judges")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    model = kvjax.load(args.model)
    tok = model.tokenizer
    text_ids = tok.encode(load_text(args.text))
    pre = tok.encode(PREFIX if args.task == "passkey" else KV_PREFIX)
    rows, scores = [], {"sequential": 0, "parallel": 0, "ape": 0}
    for t in range(args.trials):
        key, passages, query, j, depth = trial(tok, text_ids, args.passages, args.passage_tokens, t, args.task)
        row = {"trial": t, "key": key, "passage": j, "depth": round(depth, 3)}
        runs = {
            # one context at T = S = 1 is sequential encoding (tests/api/test_ape.py)
            "sequential": lambda: kvjax.ape(
                model,
                [[i for p in passages for i in p]],
                query,
                prefix=pre,
                temperature=1.0,
                scale=1.0,
                max_new_tokens=8,
            ),
            "parallel": lambda: kvjax.ape(
                model, passages, query, prefix=pre, temperature=1.0, scale=1.0, max_new_tokens=8
            ),
            "ape": lambda: kvjax.ape(model, passages, query, prefix=pre, max_new_tokens=8),
        }
        for name, run in runs.items():
            t0 = time.perf_counter()
            out = run()
            ok = check(out.texts[0], key)
            scores[name] += ok
            row[name] = {
                "answer": out.texts[0],
                "correct": ok,
                "prefill_s": round(out.stats["prefill_s"], 2),
                "wall_s": round(time.perf_counter() - t0, 1),
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {k: f"{v}/{args.trials}" for k, v in scores.items()}
    print(json.dumps({"settings": vars(args), "correct": summary}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "correct": summary, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
