"""How often consecutive ShadowKV decode steps select the same chunks (SmolLM2, CPU).

The paper keeps the chunks fetched at the previous step on the GPU and copies only the new
ones (its temporal cache); what that saves is the share of a step's selected chunks that the
previous step had selected too. This script prefills `--context` tokens of a text under
`--policy`, decodes `--steps` greedy tokens, records every layer's and KV head's selection at
each step (a `jax.debug.callback` in the decode step), and prints the mean share per layer and
overall (BENCHMARKS.md, "ShadowKV").

    python benchmarks/shadowkv_reuse.py [--policy shadowkv:rank=48,budget=512] [--context 4096] [--steps 32]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--text", default="kjv-judges")
    ap.add_argument("--policy", default="shadowkv:rank=48,budget=512")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax.eval import load_text
    from kvjax.generation import bucket_length, decode, prefill
    from kvjax.loaders import load
    from kvjax.policies import parse_policy
    from kvjax.policies.shadowkv import ShadowKV
    from kvjax.quant import calibration
    from kvjax.sampling import Sampler

    model = load(args.model)
    base = parse_policy(args.policy)
    if not isinstance(base, ShadowKV):
        raise SystemExit(f"--policy {args.policy!r} is not a shadowkv spec")
    picks: dict[int, list] = {}

    class Recording(ShadowKV):
        """ShadowKV that sends each step's selection (row 0) to the host, per layer."""

        def _step(self, state, q, k, v, q_pos, ctx):
            ids, valid = self.select(state, q)  # the same selection the step makes (XLA computes it once)

            def record(i, ok, layer=ctx.layer):
                picks.setdefault(layer, []).append([set(a[b].tolist()) for a, b in zip(i[0], ok[0])])

            jax.debug.callback(record, ids, valid, ordered=True)
            return super()._step(state, q, k, v, q_pos, ctx)

    pol = Recording(**{k: getattr(base, k) for k in base.parameters()})
    ids = calibration._first_tokens(model.tokenizer, load_text(args.text), args.context)[: args.context]
    width = bucket_length(len(ids))
    tokens = jnp.asarray(np.pad(ids, (0, width - len(ids)))[None], jnp.int32)
    lengths = jnp.asarray([len(ids)], jnp.int32)
    kw = dict(config=model.config, policy=pol, max_new_tokens=args.steps, dtype=model.dtype)
    t0 = time.perf_counter()
    logits, state = prefill(model.params, tokens, lengths, **kw)
    decode(model.params, state, logits, jax.random.key(0), sampler=Sampler(), stop_ids=(), **kw)
    jax.effects_barrier()
    per_layer = {}
    for layer, steps in sorted(picks.items()):
        shares = [
            len(now & before) / max(len(now), 1)
            for prev, cur in itertools.pairwise(steps)
            for before, now in zip(prev, cur)
        ]
        per_layer[layer] = round(float(np.mean(shares)), 3)
    print(
        json.dumps(
            {
                "policy": args.policy,
                "context": len(ids),
                "steps": args.steps,
                "reused_share_mean": round(float(np.mean(list(per_layer.values()))), 3),
                "reused_share_min_layer": min(per_layer.values()),
                "per_layer": per_layer,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
