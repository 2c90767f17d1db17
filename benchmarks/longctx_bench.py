"""End-to-end long-context generation through kvjax's own prefill and decode, per policy.

For each case (policy spec, batch B, context S): random prompt tokens through
`kvjax.generation.prefill` (jitted, compiled apart from the run), then `decode_start` and
`decode_steps` (the loop `kvjax.generate` runs): 8 warm-up steps, then two timed runs of
`--steps` steps; ms/step is the faster. Reported per case: prefill s and tokens/s, compile
times, decode ms/step, KV bytes held, peak device memory (`memory_stats()`, the process runs
this one case only), and x roofline = step time / ((weight bytes + KV bytes held) / copy
bandwidth), the bandwidth measured by a device copy in the same process. A case that runs out
of memory is reported as such.

    --device gpu : Llama-3.1-8B-shaped random bf16 weights (fused projections), each case in its
                   own process (so its peak memory is its own).
    --device cpu : a tiny random model and short contexts, in this process (the test suite's
                   smoke run of the same code).

    python benchmarks/longctx_bench.py --device gpu --cases "dense@1x32768,kivi:bits=2@1x32768"
Prints a table; with $OUT set, writes longctx_bench.jsonl there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

GPU_CASES = ",".join(
    f"{p}@{b}x{s}"
    for p in ("dense", "kivi:bits=2", "kivi:bits=4", "snapkv:budget=0.2", "snapkv:budget=0.2+kivi:bits=2")
    for b, s in ((1, 32768), (4, 32768), (1, 131072))
)
CPU_CASES = "dense@2x256,kivi:bits=2@2x256,snapkv:budget=0.2+kivi:bits=2@1x512"
COLUMNS = ["policy", "B", "S", "prefill s", "prefill tok/s", "decode ms/step", "KV GB", "peak GB", "x roofline"]


def parse_cases(text: str) -> list[tuple[str, int, int]]:
    """'SPEC@BxS,SPEC@BxS' -> [(spec, B, S)]. Specs may contain commas inside ':k=v,k=v' only
    before the '@', so split on '@' boundaries."""
    cases, rest = [], text.strip()
    while rest:
        spec, _, tail = rest.partition("@")
        shape, _, rest = tail.partition(",")
        if not spec or "x" not in shape:
            raise ValueError(f"case {spec}@{shape!r}: expected SPEC@BxS, e.g. kivi:bits=2@1x32768")
        b, s = shape.split("x")
        cases.append((spec, int(b), int(s)))
    return cases


def copy_bandwidth(n_bytes: int = 1 << 32) -> float:
    """Bytes read + written per second by a device copy of `n_bytes` (best of 10)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best


def peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_case(spec: str, batch: int, context: int, *, cfg, params, steps: int, bandwidth: float) -> dict:
    """Prefill B x S random tokens with `spec`, decode, and time both (module docstring)."""
    import jax
    import jax.numpy as jnp

    from kvjax.generation import decode_start, decode_steps, prefill
    from kvjax.policies import parse_policy
    from kvjax.sampling import Sampler

    pol = parse_policy(spec)
    dtype = jax.tree.leaves(params)[0].dtype
    new = 8 + 2 * steps
    tokens = jax.random.randint(jax.random.key(1), (batch, context), 3, cfg.vocab_size, jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    row = {"policy": spec, "B": batch, "S": context}
    kw = dict(config=cfg, policy=pol, max_new_tokens=new, dtype=dtype)
    t = time.perf_counter()
    pf = prefill.lower(params, tokens, lengths, **kw).compile()
    row["prefill compile s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    logits, state = pf(params, tokens, lengths)
    jax.block_until_ready(logits)
    row["prefill s"] = round(time.perf_counter() - t, 3)
    row["prefill tok/s"] = round(batch * context / row["prefill s"])
    row["KV GB"] = round(sum(x.nbytes for x in jax.tree.leaves(state.layers)) / 1e9, 3)
    row["peak after prefill GB"] = round((peak_bytes() or 0) / 1e9, 2)
    common = dict(config=cfg, sampler=Sampler(), stop_ids=())
    loop = decode_start(state, logits, jax.random.key(0), max_new_tokens=new, **common)
    run = dict(policy=pol, dtype=dtype, **common)
    t = time.perf_counter()
    loop = decode_steps(params, loop, 8, **run)
    jax.block_until_ready(loop.token)
    row["decode compile+8 steps s"] = round(time.perf_counter() - t, 2)
    times = []
    for until in (8 + steps, 8 + 2 * steps):
        t = time.perf_counter()
        loop = decode_steps(params, loop, until, **run)
        jax.block_until_ready(loop.token)
        times.append((time.perf_counter() - t) / steps)
    step = min(times)
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    kv = sum(x.nbytes for x in jax.tree.leaves(loop.state.layers))
    row["decode ms/step"] = round(1000 * step, 3)
    row["decode ms/step (other run)"] = round(1000 * max(times), 3)
    row["tok/s"] = round(batch / step, 1)
    row["roofline ms"] = round(1000 * (weights + kv) / bandwidth, 3)
    row["x roofline"] = round(step / ((weights + kv) / bandwidth), 2)
    row["peak GB"] = round((peak_bytes() or 0) / 1e9, 2)
    return row


def gpu_model():
    import jax.numpy as jnp
    from benchmarks_common import random_params

    from kvjax.models.presets import LLAMA3_1_8B

    cfg = dataclasses.replace(LLAMA3_1_8B, fused_projections=True)  # one weight read per projection group
    return cfg, random_params(cfg, jnp.bfloat16)


def one(args) -> dict:
    """Child process: one GPU case, one JSON line on stdout."""
    import jax

    cfg, params = gpu_model()
    bw = copy_bandwidth()
    spec, b, s = parse_cases(args.one)[0]
    row = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy TB/s": round(bw / 1e12, 3)}
    try:
        row |= run_case(spec, b, s, cfg=cfg, params=params, steps=args.steps, bandwidth=bw)
    except Exception as e:  # out of memory and friends: reported in the row, the sweep goes on
        row |= {"policy": spec, "B": b, "S": s, "error": f"{type(e).__name__}: {str(e)[:300]}"}
    return row


def table(rows):
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [str(r.get(c, "")) for c in COLUMNS]
        if "error" in r:
            cells[3] = r["error"][:90]
        print("| " + " | ".join(cells) + " |")


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--cases", default=None, help="SPEC@BxS,... (default: the module's table)")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per GPU case")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return []
    rows = []
    if args.device == "cpu":
        import jax
        from benchmarks_common import random_params

        from kvjax.models import LlamaConfig

        cfg = LlamaConfig(
            name="tiny-bench", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, max_position=4096,
        )  # fmt: skip
        params = random_params(cfg, jax.numpy.float32)
        bw = copy_bandwidth(1 << 24)
        for spec, b, s in parse_cases(args.cases or CPU_CASES):
            rows.append(run_case(spec, b, s, cfg=cfg, params=params, steps=args.steps, bandwidth=bw))
            print(json.dumps(rows[-1]), flush=True)
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        for spec, b, s in parse_cases(args.cases or GPU_CASES):
            cmd = [sys.executable, os.path.join(here, "longctx_bench.py"), "--one", f"{spec}@{b}x{s}"]
            cmd += ["--steps", str(args.steps)]
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
                last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(last[-1]) if last else {"error": f"exit {p.returncode}: {p.stderr[-300:]}"}
            except subprocess.TimeoutExpired:
                row = {"error": f"timeout after {args.timeout}s"}
            rows.append({"policy": spec, "B": b, "S": s} | row)
            print(json.dumps(rows[-1]), flush=True)
    table(rows)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "longctx_bench.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
