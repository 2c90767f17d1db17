"""Serving benchmarks for `kvjax.serve`.

--device cpu  : the load test. Starts `kvjax serve` (SmolLM2 by default) as a subprocess,
                then C concurrent clients (default 16) each send N requests (default 10)
                one after another through the official `openai` client with streaming, and
                records per request the time to the first token and the times between
                tokens (each SSE chunk with text). Prints and saves failures (must be 0),
                p50 / p99 TTFT and TBT, throughput, and the server's /health.
--device gpu  : in-process, Llama-3.1-8B-shaped random bf16 weights (token ids in, no
                text): synthetic Poisson arrivals of prompts of 8k-32k tokens, run through
                the engine with stall-free and with prefill-first scheduling (throughput,
                p50 / p99 TTFT and time between tokens, after a warm-up pass of the same
                arrivals that compiles the programs); then how many concurrent 32k requests
                the engine admits under a KV byte budget (--kv-gb) for dense,
                kivi:bits=2 and snapkv:budget=0.2+kivi:bits=2.
--smoke       : the gpu mode's code on CPU with a tiny random model and short prompts (how
                the code path is checked without a GPU).

python benchmarks/serve_bench.py --device cpu --out benchmarks/results/serve_smollm2_cpu.json
python benchmarks/serve_bench.py --device gpu --out benchmarks/results/serve_8b_gpu.json
python benchmarks/serve_bench.py --smoke
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three colours.",
    "What is the capital of Italy?",
    "Give me a short greeting.",
    "Describe a cat in a few words.",
    "What is two plus two?",
    "Say something about the weather.",
    "Name a fruit that is yellow.",
]


def percentiles(xs) -> dict:
    """p50 / p99 / mean of a list of seconds, in milliseconds (None when empty)."""
    if not len(xs):
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "n": 0}
    a = np.asarray(xs, np.float64) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
        "n": int(a.size),
    }


# ---- cpu: the HTTP load test ---------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvjax serve exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"kvjax serve did not answer /health within {timeout} s")


async def _client(client, model: str, cid: int, n: int, max_tokens: int, records: list, failures: list):
    for i in range(n):
        prompt = PROMPTS[(cid + i) % len(PROMPTS)]
        t0 = time.perf_counter()
        stamps = []
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
            )
            text = ""
            async for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    stamps.append(time.perf_counter())
                    text += piece
            if not stamps:
                raise RuntimeError("no text came back")
            records.append({"client": cid, "ttft": stamps[0] - t0, "tbt": list(np.diff(stamps)), "chars": len(text)})
        except Exception as e:  # counted, reported, and the run fails
            failures.append({"client": cid, "request": i, "error": f"{type(e).__name__}: {e}"})


async def _load(url: str, model: str, clients: int, per_client: int, max_tokens: int):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    records: list = []
    failures: list = []
    t0 = time.perf_counter()
    await asyncio.gather(
        *(_client(client, model, c, per_client, max_tokens, records, failures) for c in range(clients))
    )
    return records, failures, time.perf_counter() - t0


def cpu_load_test(args) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    run = "from kvjax.cli import main; main()"  # the `kvjax` console script, with this interpreter
    cmd = [sys.executable, "-c", run, "serve", "--model", args.model, "--policy", args.policy]
    cmd += ["--port", str(port), "--rows", str(args.rows), "--token-budget", str(args.token_budget)]
    cmd += ["--served-name", "bench"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env)
    try:
        _wait_healthy(url, proc, timeout=300)
        # warm-up: one round of every client shape compiles the programs the timed run uses
        warm, warm_fail, warm_s = asyncio.run(_load(url, "bench", args.clients, 1, args.max_tokens))
        before = httpx.get(url + "/health", timeout=10).json()
        records, failures, wall = asyncio.run(_load(url, "bench", args.clients, args.requests, args.max_tokens))
        health = httpx.get(url + "/health", timeout=10).json()
    finally:
        proc.terminate()
        proc.wait(30)
    tbt = [x for r in records for x in r["tbt"]]
    return {
        "bench": "serve load test (HTTP, openai client, streaming chat)",
        "model": args.model,
        "policy": args.policy,
        "device": "cpu",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "max_tokens": args.max_tokens,
        "rows": args.rows,
        "token_budget": args.token_budget,
        "requests": len(records) + len(failures),
        "failures": len(failures),
        "failure_examples": failures[:5],
        "warmup_requests": len(warm) + len(warm_fail),
        "warmup_s": round(warm_s, 2),
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(records) / wall, 3),
        "ttft": percentiles([r["ttft"] for r in records]),
        "tbt": percentiles(tbt),
        "engine_steps": health["steps"] - before["steps"],
        # program shapes first used in the timed pass (each compiled then, inside the times)
        "new_programs_in_timed_pass": health["programs"] - before["programs"],
        "server_health_after": health,
        "cpu_count": os.cpu_count(),
    }


# ---- gpu / smoke: in-process engine, random weights ----------------------------------


class _IdsOnly:
    """The tokenizer stand-in for random weights: prompts are token ids and nothing stops on
    an id (stop_ids=[] on every request), so text is never needed; decode returns ""."""

    eos_ids = ()

    def decode(self, ids, skip_special=True):
        return ""


def _model(smoke: bool):
    import jax.numpy as jnp
    from benchmarks_common import random_params

    from kvjax.loaders import Model
    from kvjax.models import LlamaConfig
    from kvjax.models.presets import LLAMA3_1_8B

    if smoke:
        cfg = LlamaConfig(
            name="tiny-serve", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
            num_kv_heads=2, head_dim=32, max_position=4096,
        )  # fmt: skip
        return Model(cfg, random_params(cfg, jnp.float32), _IdsOnly(), jnp.float32, "tiny-serve")
    cfg = dataclasses.replace(LLAMA3_1_8B, fused_projections=True)
    return Model(cfg, random_params(cfg, jnp.bfloat16), _IdsOnly(), jnp.bfloat16, "llama3.1-8b-random")


def _arrivals(n: int, rate: float, lengths: tuple[int, ...], seed: int) -> list[tuple[float, int]]:
    """n (arrival time s, prompt length) with exponential gaps of mean 1/rate (Poisson)."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1.0 / rate, n))
    return [(float(t), int(rng.choice(lengths))) for t in times]


def _run_workload(engine, arrivals, max_tokens: int, vocab: int) -> dict:
    """Submit each request at its arrival time (engine stepped in this thread) and time it."""
    rng = np.random.default_rng(1)
    pending = list(arrivals)
    stamps: dict[int, list[float]] = {}
    submitted: dict[int, float] = {}
    handles = []

    def on_event(ev):
        if ev.token_id is not None:
            stamps.setdefault(ev.rid, []).append(time.perf_counter())

    t0 = time.perf_counter()
    while pending or any(not h.done for h in handles):
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            _, length = pending.pop(0)
            ids = rng.integers(3, vocab, length).tolist()
            h = engine.submit(ids, max_tokens=max_tokens, stop_ids=[], on_event=on_event)
            submitted[h.rid] = time.perf_counter()
            handles.append(h)
        if not engine.step() and pending:
            time.sleep(min(0.01, max(0.0, pending[0][0] - (time.perf_counter() - t0))))
    wall = time.perf_counter() - t0
    ttft = [stamps[h.rid][0] - submitted[h.rid] for h in handles]
    tbt = [x for h in handles for x in np.diff(stamps[h.rid])]
    tokens = sum(len(h.tokens) for h in handles)
    return {
        "requests": len(handles),
        "failures": sum(h.finish_reason != "length" for h in handles),
        "generated_tokens": tokens,
        "prompt_tokens": sum(h.prompt_tokens for h in handles),
        "wall_s": round(wall, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "ttft": percentiles(ttft),
        "tbt": percentiles(tbt),
        "engine": {k: v for k, v in engine.stats.items() if not isinstance(v, tuple)},
    }


def compiled_programs() -> int:
    """Programs the engine's jitted functions hold (jit cache entries): a rise during a timed
    pass means it included compile time."""
    from kvjax.serve import engine as e

    fns = (e._init_row, e._middle_chunk, e._last_chunk, e._decode_step)
    return sum(f._cache_size() for f in fns) + len(e._FNS)


def admitted_count(model, spec: str, context: int, max_tokens: int, kv_bytes: int, rows: int, budget: int) -> dict:
    """How many `context`-token requests the engine admits at once under `kv_bytes` (its
    admission rule, without running them)."""
    from kvjax.serve import Engine

    # the budget only has to admit `rows` decodes plus a last chunk; nothing is stepped here
    eng = Engine(model, spec, rows=rows, token_budget=budget + rows + 256, max_kv_bytes=kv_bytes)
    ids = [5] * context
    try:
        for _ in range(rows):
            eng.submit(ids, max_tokens=max_tokens, stop_ids=[])
    except ValueError as e:
        return {"policy": spec, "admitted": 0, "note": str(e)}
    n = eng.admit_waiting()  # admission only: no prompt runs, no state is made
    row = eng.row_bytes(eng._prefilling[0].bound, eng._prefilling[0].headroom) if n else None
    return {
        "policy": spec,
        "context": context,
        "admitted": n,
        "row_bytes": row,
        "rows_the_bytes_hold": kv_bytes // row if row else 0,  # admission reserves rows in buckets (engine doc)
        "kv_bytes_budget": kv_bytes,
        "rows_limit": rows,
    }


def gpu_bench(args) -> dict:
    from kvjax.serve import Engine

    smoke = args.smoke
    model = _model(smoke)
    lengths = (64, 128, 192, 256) if smoke else (8192, 16384, 24576, 32768)
    n = args.n_requests or (6 if smoke else 16)
    rate = args.rate or (50.0 if smoke else 0.1)
    max_tokens = args.max_tokens or (4 if smoke else 128)
    budget = args.token_budget if args.token_budget else (64 if smoke else 512)
    rows = args.rows
    arrivals = _arrivals(n, rate, lengths, seed=0)
    kv_bytes = int(args.kv_gb * 2**30) if args.kv_gb else (2 << 20 if smoke else 40 << 30)
    out = {
        "bench": "serve engine, synthetic Poisson arrivals",
        "model": model.source,
        "device": "cpu (smoke)" if smoke else "gpu",
        "prompt_lengths": list(lengths),
        "requests": n,
        "rate_per_s": rate,
        "max_tokens": max_tokens,
        "rows": rows,
        "token_budget": budget,
        "policy": args.policy,
        "kv_bytes_budget": kv_bytes,
        "schedules": {},
    }
    for schedule in ("stall-free", "prefill-first"):
        # warm-up passes of the same arrivals compile the programs (bucket shapes depend on the
        # interleaving, so a program can still be new in the timed pass: counted below)
        for _ in range(args.warmup):
            eng = Engine(model, args.policy, rows=rows, token_budget=budget, schedule=schedule, max_kv_bytes=kv_bytes)
            _run_workload(eng, arrivals, max_tokens, model.config.vocab_size)
        eng = Engine(model, args.policy, rows=rows, token_budget=budget, schedule=schedule, max_kv_bytes=kv_bytes)
        before = compiled_programs()
        out["schedules"][schedule] = _run_workload(eng, arrivals, max_tokens, model.config.vocab_size)
        out["schedules"][schedule]["compiles_in_timed_pass"] = compiled_programs() - before
        print(schedule, json.dumps({k: v for k, v in out["schedules"][schedule].items() if k != "engine"}))
    context = 256 if smoke else 32768
    specs = ("dense", "kivi:bits=2", "snapkv:budget=0.2+kivi:bits=2")
    out["admission"] = [
        admitted_count(model, s, context, max_tokens, kv_bytes, rows=args.admission_rows, budget=budget) for s in specs
    ]
    for a in out["admission"]:
        print("admission", json.dumps(a))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--smoke", action="store_true", help="the gpu mode on CPU with a tiny model (implies gpu mode)")
    ap.add_argument("--model", default="smollm2", help="cpu mode: the model kvjax serve loads")
    ap.add_argument("--policy", default="dense", help="the engine's cache policy")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=10, help="cpu mode: requests per client")
    ap.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (cpu default 8)")
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--token-budget", type=int, default=None)
    ap.add_argument("--n-requests", type=int, default=None, help="gpu mode: requests in the Poisson workload")
    ap.add_argument("--rate", type=float, default=None, help="gpu mode: arrivals per second")
    ap.add_argument("--kv-gb", type=float, default=None, help="gpu mode: KV byte budget (GiB; default 40)")
    ap.add_argument("--admission-rows", type=int, default=64, help="gpu mode: row limit for the admission count")
    ap.add_argument("--warmup", type=int, default=2, help="gpu mode: warm-up passes before the timed one")
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        args.max_tokens = args.max_tokens or 8
        args.token_budget = args.token_budget or 256
        result = cpu_load_test(args)
    else:
        result = gpu_bench(args)
    print(json.dumps(result, indent=1))
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.device == "cpu" and not args.smoke and result["failures"]:
        raise SystemExit(f"{result['failures']} requests failed")
    return result


if __name__ == "__main__":
    main()
