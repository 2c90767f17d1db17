"""End-to-end long-context generation through kvjax's own prefill and decode, per policy.

For each case (policy spec, batch B, context S): random prompt tokens through
`kvjax.generation.prefill` (jitted, compiled apart from the run; in chunks of `--prefill-chunk`
tokens when S is larger than that), then `decode_start` and `decode_steps` (the loop
`kvjax.generate` runs): 8 warm-up steps, then two timed runs of `--steps` steps; ms/step is the
faster. Reported per case: prefill s and tokens/s, prefill time over dense's at the same B x S
(the compression overhead, when the dense case ran too), compile times, decode ms/step, KV bytes
held, KV bytes read per decode step (device and host), peak device memory (`memory_stats()`;
on GPU each case runs in its own process, so its peak is its own), the attention calls that
took the jnp reference (`kvjax.attention.fallbacks()`), and x roofline = step time / roofline,
roofline = (weight bytes + KV bytes read per step on the device) / copy bandwidth + host bytes
read per step / host-to-device bandwidth, both bandwidths measured in the same process (x read
roofline: the same over the bandwidth of a device reduction, which only reads, as decode does;
on GPU the stricter of the two). A case
that runs out of memory is reported as such.

    --device gpu : Llama-3.1-8B-shaped random bf16 weights (fused projections), each case in its
                   own process.
    --device cpu : a tiny random model and short contexts, in this process (the test suite's
                   smoke run of the same code); with --isolate each case in its own process, as
                   on GPU.
    --max-batch  : per policy, the largest batch that fits at the context `--max-batch-context`,
                   found by running prefill and decode (batch 1, 2, 4, ... until one runs out of
                   memory, XLA's RESOURCE_EXHAUSTED, then bisection between the last batch that
                   ran and the first that did not, down to `--max-batch-tolerance`); on GPU each
                   trial in its own process.
    --profile N  : after the timed runs, N more decode steps under `jax.profiler.trace`; per
                   operation (each layer's copies together) launches and microseconds per step,
                   device busy time and span per step (the gap is launch overhead and syncs).
    --hf         : HF transformers (torch, sdpa attention, DynamicCache) at each case's batch and
                   context with the dense cache, the floor: prefill, then greedy decode steps
                   timed the same way (CUDA on GPU, float32 on the CPU); out of memory reported.

    python benchmarks/longctx_bench.py --device gpu --cases "dense@1x32768,kivi:bits=2@1x32768"
    python benchmarks/longctx_bench.py --device gpu --cases "kivi:bits=2@1x1048576" --prefill-chunk 8192
    python benchmarks/longctx_bench.py --device gpu --max-batch --policies "dense,kivi:bits=2"
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

#: Policies of the default table: dense, quantized, evicted, evicted + quantized, and the
#: retrieval / host-offload policies that need no per-model calibration (a2ats and cskv do:
#: they have a SmolLM2 calibration only, so they are not in the default list for the 8B shape).
GPU_POLICIES = (
    "dense",
    "kivi:bits=2",
    "kivi:bits=4",
    "snapkv:budget=0.2",
    "snapkv:budget=0.2+kivi:bits=2",
    "quest",
    "shadowkv",
    "offload",
)
GPU_SHAPES = ((1, 32768), (8, 32768), (16, 32768), (1, 131072), (8, 131072), (16, 131072))
GPU_CASES = ",".join(f"{p}@{b}x{s}" for p in GPU_POLICIES for b, s in GPU_SHAPES)
#: The 512k / 1M cells (run with --prefill-chunk): the policies whose prefill does not hold the
#: whole dense cache on the device (`shadowkv`, `offload` keep it in host memory).
GPU_LONG_CASES = ",".join(f"{p}@1x{s}" for p in ("shadowkv", "offload", "kivi:bits=2") for s in (524288, 1048576))
CPU_CASES = "dense@2x256,kivi:bits=2@2x256,snapkv:budget=0.2+kivi:bits=2@1x512"
COLUMNS = [
    "policy", "B", "S", "prefill s", "prefill tok/s", "prefill x dense", "decode ms/step", "KV GB",
    "KV GB read/step", "peak GB", "x roofline", "x read roofline", "fallbacks",
]  # fmt: skip
MAX_BATCH_COLUMNS = ["policy", "S", "max batch", "first failing batch", "trials"]


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


def parse_policies(text: str) -> list[str]:
    """'SPEC,SPEC' -> [SPEC]: a comma followed by `name=` continues the previous spec's
    parameters ('snapkv:budget=0.2,window=32,kivi:bits=2' is two specs)."""
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if out and "=" in part and ":" not in part.split("=")[0]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


def is_out_of_memory(text: str) -> bool:
    """Whether an error message says the device ran out of memory (XLA's RESOURCE_EXHAUSTED,
    the allocator's 'Out of memory', torch's OutOfMemoryError)."""
    t = text.lower()
    return "resource_exhausted" in t or "out of memory" in t or "outofmemoryerror" in t


def largest_batch(fits, limit: int, tolerance: float = 0.0) -> tuple[int, int | None, list[tuple[int, bool]]]:
    """The largest batch b in 1..limit with fits(b), by running: b = 1, 2, 4, ... until one does
    not fit (or `limit`, which is tried itself), then bisection between the last batch that fit
    and the first that did not until they are at most max(1, tolerance x the one that fit)
    apart. Assumes that a batch fits when a larger one does. fits(b) returns a bool and raises
    for anything but running out of memory.
    Returns (largest batch that ran (0: none), smallest batch that did not (None: none failed
    up to `limit`), [(batch, fitted)] in the order tried)."""
    if limit < 1:
        raise ValueError(f"limit={limit} must be >= 1")
    trials: list[tuple[int, bool]] = []

    def probe(b):
        ok = bool(fits(b))
        trials.append((b, ok))
        return ok

    if not probe(1):
        return 0, 1, trials
    lo, hi, b = 1, None, 2
    while hi is None and lo < limit:
        b = min(b, limit)
        if probe(b):
            lo, b = b, 2 * b
        else:
            hi = b
    if hi is None:
        return lo, None, trials
    while hi - lo > max(1, int(tolerance * lo)):
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi, trials


def _best_seconds(f, x, repeats: int = 10) -> float:
    """Fastest of `repeats` timed calls f(x) (after one warm-up call that compiles)."""
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(n_bytes: int = 1 << 32) -> float:
    """Bytes read + written per second by a device copy of `n_bytes` (best of 10)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 4,), jnp.float32)
    return 2 * x.nbytes / _best_seconds(jax.jit(lambda a: a * 1.0001), x)


def read_bandwidth(n_bytes: int = 1 << 32) -> float:
    """Bytes read per second by a device reduction over `n_bytes` (best of 10): the bandwidth a
    decode step, which reads weights and cache and writes little, can reach."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    return x.nbytes / _best_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x)


def host_bandwidth(n_bytes: int = 1 << 28) -> float:
    """Bytes per second of a host-to-device copy (`jax.device_put` of a numpy array, best of 5)."""
    import jax
    import numpy as np

    x = np.ones((n_bytes // 4,), np.float32)
    jax.device_put(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        jax.device_put(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return x.nbytes / best


def peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_case(
    spec: str,
    batch: int,
    context: int,
    *,
    cfg,
    params,
    steps: int,
    bandwidth: float,
    host_bw: float | None = None,
    read_bw: float | None = None,
    prefill_chunk: int | None = None,
    profile_steps: int = 0,
) -> dict:
    """Prefill B x S random tokens with `spec`, decode, and time both (module docstring); with
    `profile_steps`, then trace that many more decode steps with the JAX profiler and add their
    per-operation summary (`benchmarks_common.profile_summary`) as row["profile"]."""
    import jax
    import jax.numpy as jnp

    from kvjax import attention
    from kvjax.generation import decode_start, decode_steps, prefill
    from kvjax.policies import parse_policy
    from kvjax.sampling import Sampler

    pol = parse_policy(spec)
    dtype = jax.tree.leaves(params)[0].dtype
    new = 8 + 2 * steps + profile_steps
    chunk = prefill_chunk if prefill_chunk and context > prefill_chunk else None
    if chunk and context % chunk:
        raise ValueError(f"context {context} must be a multiple of --prefill-chunk {chunk}")
    tokens = jax.random.randint(jax.random.key(1), (batch, context), 3, cfg.vocab_size, jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    row = {"policy": spec, "B": batch, "S": context, "prefill chunk": chunk}
    attention.reset_fallbacks()
    kw = dict(config=cfg, policy=pol, max_new_tokens=new, dtype=dtype, prefill_chunk=chunk)
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
    host_read = loop.state.host_bytes_read_per_step
    device_read = loop.state.kv_bytes_read_per_step - host_read
    roofline = (weights + device_read) / bandwidth + (host_read / host_bw if host_read and host_bw else 0.0)
    row["decode ms/step"] = round(1000 * step, 3)
    row["decode ms/step (other run)"] = round(1000 * max(times), 3)
    row["tok/s"] = round(batch / step, 1)
    row["KV GB read/step"] = round(device_read / 1e9, 4)
    row["host GB read/step"] = round(host_read / 1e9, 4)
    row["roofline ms"] = round(1000 * roofline, 3)
    row["x roofline"] = round(step / roofline, 2)
    if read_bw:
        read_roof = (weights + device_read) / read_bw + (host_read / host_bw if host_read and host_bw else 0.0)
        row["x read roofline"] = round(step / read_roof, 2)
    row["peak GB"] = round((peak_bytes() or 0) / 1e9, 2)
    row["fallbacks"] = sum(attention.fallbacks().values())
    if row["fallbacks"]:
        row["fallback reasons"] = attention.fallbacks()
    if profile_steps:
        import tempfile

        from benchmarks_common import profile_summary

        trace_dir = tempfile.mkdtemp(prefix="kvjax-profile-")
        with jax.profiler.trace(trace_dir):
            loop = decode_steps(params, loop, new, **run)
            jax.block_until_ready(loop.token)
        row["profile"] = profile_summary(trace_dir, profile_steps)
    return row


def hf_case(batch: int, context: int, *, cfg, steps: int, device: str) -> dict:
    """HF transformers (torch, sdpa, DynamicCache) with random weights of `cfg`'s shape: prefill
    B x S random tokens, then greedy decode steps one token at a time (2 warm-up steps, then two
    timed runs of `steps`; ms/step is the faster). bfloat16 on CUDA, float32 on the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    row = {"policy": f"HF-torch {torch.__version__} sdpa (dense)", "B": batch, "S": context}
    hc = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, max_position_embeddings=max(context + 64, 8192),
        tie_word_embeddings=False,
    )  # fmt: skip
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cuda = device == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(hc).to(dtype).eval()
    model.config._attn_implementation = "sdpa"
    x = torch.randint(3, cfg.vocab_size, (batch, context), device=device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        sync()
        t = time.perf_counter()
        out = model(x, use_cache=True, logits_to_keep=1)
        sync()
        row["prefill s"] = round(time.perf_counter() - t, 3)
        row["prefill tok/s"] = round(batch * context / row["prefill s"])
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)

        def steps_of(n):
            nonlocal past, tok
            sync()
            t = time.perf_counter()
            for _ in range(n):
                o = model(tok, past_key_values=past, use_cache=True)
                past, tok = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            return (time.perf_counter() - t) / n

        steps_of(2)
        step = min(steps_of(steps), steps_of(steps))
    row["decode ms/step"] = round(1000 * step, 3)
    row["tok/s"] = round(batch / step, 1)
    if cuda:
        row["peak GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
    return row


def gpu_model():
    import jax.numpy as jnp
    from benchmarks_common import random_params

    from kvjax.models.presets import LLAMA3_1_8B

    cfg = dataclasses.replace(LLAMA3_1_8B, fused_projections=True)  # one weight read per projection group
    return cfg, random_params(cfg, jnp.bfloat16)


def cpu_config():
    from kvjax.models import LlamaConfig

    return LlamaConfig(
        name="tiny-bench", vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
        num_kv_heads=2, head_dim=32, max_position=4096,
    )  # fmt: skip


def cpu_model():
    import jax
    from benchmarks_common import random_params

    cfg = cpu_config()
    return cfg, random_params(cfg, jax.numpy.float32)


def _error_row(spec, b, s, e: BaseException | str) -> dict:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    row = {"policy": spec, "B": b, "S": s, "error": text[:300]}
    if is_out_of_memory(text):
        row["oom"] = True
    return row


def one(args) -> dict:
    """Child process: one case (or HF case with --hf), one JSON line on stdout; the 8B shape on
    GPU, the tiny model with --device cpu (how the smoke test runs this path)."""
    spec, b, s = parse_cases(args.one)[0]
    gpu = args.device == "gpu"
    if args.hf:
        from kvjax.models.presets import LLAMA3_1_8B

        try:
            cfg = LLAMA3_1_8B if gpu else cpu_config()
            return hf_case(b, s, cfg=cfg, steps=args.steps, device="cuda" if gpu else "cpu")
        except Exception as e:  # torch.cuda.OutOfMemoryError and friends: reported in the row
            return _error_row(spec, b, s, e)
    import jax

    cfg, params = gpu_model() if gpu else cpu_model()
    bw = copy_bandwidth() if gpu else copy_bandwidth(1 << 24)
    rbw = read_bandwidth() if gpu else read_bandwidth(1 << 24)
    row = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "copy TB/s": round(bw / 1e12, 3)}
    row["read TB/s"] = round(rbw / 1e12, 3)
    try:
        hbw = host_bandwidth() if gpu else bw
        row["host GB/s"] = round(hbw / 1e9, 1)
        row |= run_case(
            spec, b, s, cfg=cfg, params=params, steps=args.steps, bandwidth=bw, host_bw=hbw, read_bw=rbw,
            prefill_chunk=args.prefill_chunk, profile_steps=args.profile,
        )  # fmt: skip
    except Exception as e:  # out of memory and friends: reported in the row, the sweep goes on
        row |= _error_row(spec, b, s, e)
    return row


def in_child(case: str, args, hf: bool = False, steps: int | None = None) -> dict:
    """Run one case in a child process (its own device memory and peak); its JSON row."""
    spec, b, s = parse_cases(case)[0]
    here = os.path.dirname(os.path.abspath(__file__))
    cmd = [sys.executable, os.path.join(here, "longctx_bench.py"), "--one", case, "--device", args.device]
    cmd += ["--steps", str(steps or args.steps)]
    if args.prefill_chunk:
        cmd += ["--prefill-chunk", str(args.prefill_chunk)]
    if args.profile and not hf:
        cmd += ["--profile", str(args.profile)]
    if hf:
        cmd += ["--hf"]
    env = dict(os.environ)
    if hf:  # torch allocates the device memory: JAX (imported with kvjax) must not take it first
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"policy": spec, "B": b, "S": s, "error": f"timeout after {args.timeout}s"}
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if last:
        return {"policy": spec, "B": b, "S": s} | json.loads(last[-1])
    return _error_row(spec, b, s, f"exit {p.returncode}: {p.stderr[-300:]}")  # e.g. an allocator abort


def add_prefill_ratios(rows: list[dict]) -> None:
    """'prefill x dense': each row's prefill time over the dense row's at the same B x S."""
    dense = {(r["B"], r["S"]): r["prefill s"] for r in rows if r.get("policy") == "dense" and "prefill s" in r}
    for r in rows:
        base = dense.get((r.get("B"), r.get("S")))
        if base and "prefill s" in r and not str(r["policy"]).startswith("HF"):
            r["prefill x dense"] = round(r["prefill s"] / base, 3)


def table(rows, columns=COLUMNS):
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [str(r.get(c, "")) for c in columns]
        if "error" in r:
            cells[3] = ("out of memory: " if r.get("oom") else "") + r["error"][:90]
        print("| " + " | ".join(cells) + " |")


def max_batch_rows(args, cfg=None, params=None, bw=None) -> list[dict]:
    """--max-batch: per policy, `largest_batch` at --max-batch-context (module docstring); each
    trial in a child process with --isolate (always on GPU), else in this one with cfg/params."""
    rows = []
    s = args.max_batch_context
    for spec in parse_policies(args.policies):

        def fits(b, spec=spec):
            if not args.isolate:
                try:
                    run_case(
                        spec, b, s, cfg=cfg, params=params, steps=1, bandwidth=bw, prefill_chunk=args.prefill_chunk
                    )
                    return True
                except Exception as e:
                    if is_out_of_memory(f"{type(e).__name__}: {e}"):
                        return False
                    raise
            r = in_child(f"{spec}@{b}x{s}", args, steps=2)
            if "error" in r and not r.get("oom"):
                raise RuntimeError(r["error"])
            print(json.dumps(r), flush=True)
            return "error" not in r

        try:
            best, fail, trials = largest_batch(fits, args.max_batch_limit, args.max_batch_tolerance)
            rows.append(
                {"policy": spec, "S": s, "max batch": best, "first failing batch": fail,
                 "trials": " ".join(f"{b}{'+' if ok else '-'}" for b, ok in trials)}
            )  # fmt: skip
        except Exception as e:  # not an out-of-memory: reported, the next policy goes on
            rows.append({"policy": spec, "S": s, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    ap.add_argument("--cases", default=None, help="SPEC@BxS,... (default: the module's table)")
    ap.add_argument("--long", action="store_true", help="the 512k / 1M cases (GPU_LONG_CASES) as the default")
    ap.add_argument("--steps", type=int, default=32, help="decode steps per timed run")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per GPU case")
    ap.add_argument("--prefill-chunk", type=int, default=None, help="prefill in chunks of N tokens where S > N")
    ap.add_argument("--hf", action="store_true", help="add HF transformers (torch sdpa) at each case's B x S")
    ap.add_argument("--max-batch", action="store_true", help="find the largest batch per policy (module doc)")
    ap.add_argument("--policies", default=",".join(GPU_POLICIES), help="--max-batch: SPEC,SPEC,...")
    ap.add_argument("--max-batch-context", type=int, default=131072)
    ap.add_argument("--max-batch-limit", type=int, default=256, help="largest batch tried")
    ap.add_argument("--max-batch-tolerance", type=float, default=0.0, help="stop bisecting within this fraction")
    ap.add_argument("--isolate", action="store_true", help="cpu: each case in its own process, as on GPU")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N", help="trace N more decode steps per case (module doc)"
    )
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.isolate = args.isolate or args.device == "gpu"
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        ap.error(f"--prefill-chunk {args.prefill_chunk} must be >= 1")
    if args.one:
        print(json.dumps(one(args)), flush=True)
        return []
    if args.max_batch:
        model = () if args.isolate else (*cpu_model(), copy_bandwidth(1 << 24))
        rows = max_batch_rows(args, *model)
        table(rows, MAX_BATCH_COLUMNS)
        return _write(rows)
    cases = parse_cases(
        args.cases or (CPU_CASES if args.device == "cpu" else GPU_LONG_CASES if args.long else GPU_CASES)
    )
    shapes = list(dict.fromkeys((b, s) for _, b, s in cases))
    rows = []
    if args.isolate:  # each case in its own process: its own device memory and peak
        for spec, b, s in cases:
            rows.append(in_child(f"{spec}@{b}x{s}", args))
            print(json.dumps(rows[-1]), flush=True)
        for b, s in shapes if args.hf else ():
            rows.append(in_child(f"hf@{b}x{s}", args, hf=True))
            print(json.dumps(rows[-1]), flush=True)
    else:  # --device cpu: the tiny model in this process
        cfg, params = cpu_model()
        bw = copy_bandwidth(1 << 24)
        for spec, b, s in cases:
            rows.append(
                run_case(spec, b, s, cfg=cfg, params=params, steps=args.steps, bandwidth=bw,
                         host_bw=bw, prefill_chunk=args.prefill_chunk, profile_steps=args.profile)
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        for b, s in shapes if args.hf else ():
            rows.append(hf_case(b, s, cfg=cfg, steps=args.steps, device="cpu"))
            print(json.dumps(rows[-1]), flush=True)
    add_prefill_ratios(rows)
    table(rows)
    if args.profile:
        from benchmarks_common import print_profile

        for r in rows:
            if "profile" in r:
                print_profile(f"{r['policy']} @ {r['B']}x{r['S']}", r["profile"])
    return _write(rows)


def _write(rows: list[dict]) -> list[dict]:
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "longctx_bench.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
