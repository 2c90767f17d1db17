"""TriForce speculative decoding: acceptance, tokens per target forward and decode speed.

    --device cpu : SmolLM2-135M (the embedded GGUF, float32 activations and cache) on a prompt of
                   `--context` tokens of the KJV Judges text (else the stdlib's pydoc topics):
                   1. grid: the one-level hierarchy (target over the retrieval cache -> target
                      over its full cache) for each retrieval budget x gamma x temperature:
                      acceptance rate, tokens committed per target forward, decode s, tokens/s;
                   2. wall clock at `--wall-context` tokens, temperature 0: plain dense decoding
                      vs speculative (one level and both levels), decode tokens/s.
                   Compilation is excluded from every time (programs compiled before the run).
    --device gpu : Llama-3.1-8B-shaped random bf16 weights and a dense cache of `--gpu-context`
                   (128k) random keys/values: ms per target forward of 1 token and of gamma + 1
                   tokens, and of a 1-token draft step over a retrieval cache of `--gpu-budget`
                   tokens (random weights give meaningless acceptance: combine these costs with
                   the acceptance measured on SmolLM2).
    --smoke      : both modes on a tiny random model and short contexts on the CPU (what the
                   test suite runs), so a broken script is found before a real run.

    python benchmarks/triforce_bench.py --context 2048 --wall-context 8192 \\
        --out benchmarks/results/triforce_smollm2_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time


def _text_ids(tokenizer, n: int) -> list[int]:
    from kvjax.eval import load_text

    for name in ("kjv-judges", "pydoc"):
        try:
            ids = tokenizer.encode(load_text(name))
        except Exception:  # a text that is not installed here: the next one
            continue
        if len(ids) >= n:
            return ids[:n]
    raise RuntimeError(f"no offline text of {n} tokens found")


def _decode_run(model, levels, states, first, *, new: int, temperature: float, seed: int = 0) -> dict:
    """Compile, then run `speculative_decode` once; times exclude compilation."""
    import jax
    import jax.numpy as jnp

    from kvjax.generation.speculative import speculative_decode
    from kvjax.sampling import Sampler

    sampler = Sampler(temperature=temperature)
    static = dict(levels=levels, max_new_tokens=new, sampler=sampler, stop_ids=())
    params = (model.params, None)
    args = (params, states, first, jax.random.key(seed), jnp.int32(new))
    t = time.perf_counter()
    exe = speculative_decode.lower(*args, **static).compile()
    compile_s = time.perf_counter() - t
    t = time.perf_counter()
    out, n_out, _, info = jax.block_until_ready(exe(*args))
    dt = time.perf_counter() - t
    acc, prop = info["accepted"].tolist(), info["proposed"].tolist()
    generated = int(n_out.sum())
    return {
        "acceptance_rate": [a / p if p else None for a, p in zip(acc, prop)],
        "tokens_per_target_forward": int(info["round_tokens"]) / max(int(info["row_rounds"]), 1),
        "target_forwards": int(info["rounds"]),
        "generated": generated,
        "decode_s": round(dt, 3),
        # the first token comes from the prefill logits, as in `generate`'s decode_tokens_per_s
        "decode_tokens_per_s": round((generated - out.shape[0]) / dt, 2),
        "compile_s": round(compile_s, 1),
        "tokens": out.tolist(),
    }


def _plain_run(model, tokens, lengths, *, new: int, temperature: float) -> dict:
    import jax
    import jax.numpy as jnp

    from kvjax.generation import decode, prefill
    from kvjax.policies import Dense
    from kvjax.sampling import Sampler

    kw = dict(config=model.config, policy=Dense(), dtype=model.dtype)
    logits, state = prefill(model.params, tokens, lengths, max_new_tokens=new, **kw)
    static = dict(max_new_tokens=new, sampler=Sampler(temperature=temperature), stop_ids=(), **kw)
    args = (model.params, state, logits, jax.random.key(0), jnp.int32(new))
    exe = decode.lower(*args, **static).compile()
    del state
    t = time.perf_counter()
    out, n_out, _ = jax.block_until_ready(exe(*args))
    dt = time.perf_counter() - t
    generated = int(n_out.sum())
    return {
        "decode_s": round(dt, 3),
        "decode_tokens_per_s": round((generated - out.shape[0]) / dt, 2),
        "tokens": out.tolist(),
    }


def _prefilled(model, plan, ids, slack_plan):
    """(levels of `plan`, states, first logits) for one prompt, headroom for `slack_plan`."""
    import jax
    import jax.numpy as jnp

    from kvjax.generation.speculative import build_levels, prefill_levels
    from kvjax.policies import Dense

    levels = build_levels(model, plan, Dense())
    toks = jnp.asarray([ids], jnp.int32)
    lens = jnp.asarray([len(ids)], jnp.int32)
    first, states = prefill_levels(model, levels, toks, lens, len(ids), len(ids), NEW_BUCKET + slack_plan.slack)
    return levels, jax.block_until_ready(states), first


NEW_BUCKET = 64


def cpu(args) -> dict:
    import jax
    import jax.numpy as jnp

    from kvjax.generation.speculative import TriForce

    if args.smoke:
        from benchmarks_common import random_params

        from kvjax.loaders import Model
        from kvjax.models import LlamaConfig

        cfg = LlamaConfig(
            name="tiny-bench", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, max_position=4096,
        )  # fmt: skip
        model = Model(cfg, random_params(cfg, jnp.float32), None, jnp.float32, "tiny-bench")
        ids_for = lambda n: [int(x) for x in jax.random.randint(jax.random.key(n), (n,), 3, 128)]
    else:
        from kvjax.loaders import load

        model = load("smollm2", dtype=jnp.float32)
        ids_for = lambda n: _text_ids(model.tokenizer, n)
    global NEW_BUCKET
    NEW_BUCKET = args.new
    result = {
        "model": model.source if hasattr(model, "source") else "?",
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "jax": jax.__version__,
        "context": args.context,
        "new_tokens": args.new,
        "grid": [],
        "wall": [],
    }
    budgets = [int(b) for b in args.budgets.split(",")]
    gammas = [int(g) for g in args.gammas.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    ids = ids_for(args.context)
    widest = TriForce(budget=budgets[0], gamma=max(gammas), draft_gamma=0)
    plain_ref = None
    for budget in budgets:
        t = time.perf_counter()
        levels, states, first = _prefilled(model, TriForce(budget=budget, gamma=gammas[0], draft_gamma=0), ids, widest)
        prefill_s = time.perf_counter() - t
        for gamma in gammas:
            for temp in temps:
                plan = TriForce(budget=budget, gamma=gamma, draft_gamma=0)
                lv = (levels[0], dataclasses.replace(levels[1], gamma=gamma))
                run = _decode_run(model, lv, jax.tree.map(jnp.copy, states), first, new=args.new, temperature=temp)
                if temp == 0:
                    if plain_ref is None:
                        toks = jnp.asarray([ids], jnp.int32)
                        plain_ref = _plain_run(model, toks, jnp.asarray([len(ids)]), new=args.new, temperature=0.0)
                        result["plain_at_context"] = {k: v for k, v in plain_ref.items() if k != "tokens"}
                    run["equals_plain_greedy"] = run["tokens"] == plain_ref["tokens"]
                run.pop("tokens")
                row = {"spec": plan.spec(), "budget": budget, "gamma": gamma, "temperature": temp, **run}
                row["prefill_s_incl_compile"] = round(prefill_s, 1)
                result["grid"].append(row)
                print(json.dumps(row), flush=True)
    # wall clock at the longer context, greedy
    wall_ids = ids_for(args.wall_context)
    toks = jnp.asarray([wall_ids], jnp.int32)
    plain = _plain_run(model, toks, jnp.asarray([len(wall_ids)]), new=args.new, temperature=0.0)
    result["wall"].append({"spec": "plain dense", "context": args.wall_context, **plain})
    result["wall"][-1].pop("tokens")
    print(json.dumps(result["wall"][-1]), flush=True)
    for spec in args.wall_specs.split(";"):
        from kvjax.generation.speculative import parse_speculative

        plan = parse_speculative(spec)
        levels, states, first = _prefilled(model, plan, wall_ids, plan)
        run = _decode_run(model, levels, states, first, new=args.new, temperature=0.0)
        run["equals_plain_greedy"] = run.pop("tokens") == plain["tokens"]
        run["speedup_vs_plain"] = round(plain["decode_s"] / run["decode_s"], 3)
        result["wall"].append({"spec": plan.spec(), "context": args.wall_context, **run})
        print(json.dumps(result["wall"][-1]), flush=True)
    return result


def gpu(args) -> dict:
    """Per-forward costs at long context (module doc)."""
    import jax
    import jax.numpy as jnp
    from benchmarks_common import random_params

    from kvjax.generation.speculative import Level, _feed
    from kvjax.policies import Dense, TriForceRetrieval
    from kvjax.state import KVState, SlotKV

    if args.smoke:
        from kvjax.models import LlamaConfig

        cfg = LlamaConfig(
            name="tiny-bench", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, max_position=4096,
        )  # fmt: skip
        dtype, context, budget = jnp.float32, 512, 64
    else:
        from kvjax.models.presets import LLAMA3_1_8B

        cfg = dataclasses.replace(LLAMA3_1_8B, fused_projections=True)
        dtype, context, budget = jnp.bfloat16, args.gpu_context, args.gpu_budget
    params = (random_params(cfg, dtype),)
    gammas = [int(g) for g in args.gammas.split(",")]
    headroom = 16 * (max(gammas) + 1) * (args.reps + 2)

    def state_of(n: int) -> KVState:
        """A cache of n random tokens at positions 0..n-1 plus `headroom` empty slots."""
        shape = (1, cfg.num_kv_heads, n + headroom, cfg.head_dim)
        pos = jnp.where(jnp.arange(n + headroom) < n, jnp.arange(n + headroom), -1).astype(jnp.int32)
        layers = []
        for i in range(cfg.num_layers):
            k = (jax.random.normal(jax.random.key(2 * i), shape, jnp.float32) * 0.5).astype(dtype)
            v = (jax.random.normal(jax.random.key(2 * i + 1), shape, jnp.float32) * 0.5).astype(dtype)
            layers.append(SlotKV(k, v, jnp.broadcast_to(pos, shape[:3]), jnp.full((1,), n, jnp.int32)))
        return KVState(layers=tuple(layers), lengths=jnp.asarray([n], jnp.int32))

    def time_forward(level: Level, n: int, t: int) -> float:
        """Best ms of `reps` forwards of t tokens into a cache of n tokens (state donated and fed
        back, so the cache is updated in place as in the decode loop)."""

        def run(params, state):
            pos = state.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
            logits, state = _feed(params, level, state, jnp.full((1, t), 5, jnp.int32), pos, None)
            return logits[:, -1].sum(), state

        step = jax.jit(run, donate_argnums=(1,))
        state = state_of(n)
        for _ in range(2):
            _, state = jax.block_until_ready(step(params, state))
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            _, state = jax.block_until_ready(step(params, state))
            best = min(best, time.perf_counter() - t0)
        del state
        return 1000 * best

    target = Level(0, cfg, Dense(), dtype)
    draft = Level(0, cfg, TriForceRetrieval(), dtype)
    row = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "context": context, "budget": budget}
    row["target_1_token_ms"] = round(time_forward(target, context, 1), 3)
    for g in gammas:
        row[f"target_{g + 1}_tokens_ms"] = round(time_forward(target, context, g + 1), 3)
    row["retrieval_draft_1_token_ms"] = round(time_forward(draft, budget, 1), 3)
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, short contexts (CPU)")
    ap.add_argument("--context", type=int, default=2048, help="prompt tokens of the grid")
    ap.add_argument("--wall-context", type=int, default=8192, help="prompt tokens of the wall-clock comparison")
    ap.add_argument("--new", type=int, default=64, help="new tokens per run")
    ap.add_argument("--budgets", default="64,128,256,512", help="retrieval budgets of the grid")
    ap.add_argument("--gammas", default="2,4,8")
    ap.add_argument("--temperatures", default="0,0.6")
    ap.add_argument(
        "--wall-specs",
        default="triforce:budget=256,gamma=4,draft_gamma=0;triforce:budget=256,gamma=6,draft_gamma=2,sink=16,window=48",
        help="';'-separated speculative specs timed against plain decoding at --wall-context",
    )
    ap.add_argument("--gpu-context", type=int, default=131072)
    ap.add_argument("--gpu-budget", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5, help="timed forwards per GPU case (best kept)")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.context, args.wall_context, args.new = (
            min(args.context, 96),
            min(args.wall_context, 160),
            min(args.new, 16),
        )
        args.budgets = "16,32"
        args.gammas = ",".join(args.gammas.split(",")[:2])
        args.wall_specs = (
            "triforce:budget=32,gamma=2,draft_gamma=0;triforce:budget=32,gamma=3,draft_gamma=2,sink=4,window=8"
        )
    result = gpu(args) if args.device == "gpu" else cpu(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
