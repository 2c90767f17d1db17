"""Context-parallel prefill time on 1, 2 and 4 GPUs (kvjax.parallel), random-weight models.

    python benchmarks/ring_bench.py gpu-x4 --budget 300      # the whole plan on a 4-GPU host
    python benchmarks/ring_bench.py run --gpus 4 --model llama3.1-8b --lengths 131072
    python benchmarks/ring_bench.py run --cpu-devices 4 --model tiny --lengths 256   # smoke test, CPU

`run` times `kvjax.parallel.prefill` (whole model, bf16, batch 1, one prompt of `length`
tokens, dense or KIVI-2 cache) over a mesh of the first `--gpus` visible devices: AOT
compile (timed), one warm-up call, then `--reps` timed calls (median, host clock after
`block_until_ready`). Each row also carries XLA's compiled memory analysis per device
(arguments + outputs + temporaries, aliasing subtracted) and, from it, the longest prompt
that fits: params + per-token bytes x tokens <= usable memory, a linear extrapolation
from the measured length (prefill memory is linear in tokens with flash attention).
Before timing, the prefix kernels (cuDNN, kvjax's Pallas block-sparse) are checked
against the jnp reference on random blocks and the faster valid one is used.

`gpu-x4` runs the plan for a 4-GPU host in two phases: 1-GPU and 2-GPU jobs concurrently
on disjoint GPUs (CUDA_VISIBLE_DEVICES 0 | 1,2 | 3), then the 4-GPU job; each job stops
starting new rows at its deadline. All rows go to stdout (JSON lines) and $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = {"smollm2": "smollm2-135m", "llama3.1-8b": "llama3.1-8b"}


_T0 = time.monotonic()


def log(row: dict) -> None:
    row = {**row, "t": round(time.monotonic() - _T0, 1)}
    print("ROW " + json.dumps(row, default=str), flush=True)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, f"ring_rows_{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


def model_config(name: str):
    from kvjax.models import presets
    from kvjax.models.config import LlamaConfig

    if name == "tiny":
        return LlamaConfig(
            name="tiny",
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=64,
            max_position=1 << 20,
        )
    return presets.get_preset(MODELS.get(name, name))


def random_params(cfg, sharding, dtype):
    """normal(0.02) weights of the shapes `init_params` gives, made on the devices: one small
    jitted generator per distinct shape (a single jit over all ~300 leaves of an 8B model
    is slow to compile)."""
    import functools

    import jax
    import jax.numpy as jnp

    from kvjax.models.forward import init_params

    shapes = jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))
    leaves, tree = jax.tree.flatten(shapes)

    @functools.cache
    def maker(shape, dt):
        return jax.jit(lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(dt), out_shardings=sharding)

    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(tree, [maker(x.shape, x.dtype)(k) for k, x in zip(keys, leaves)])


def check_kernels(kernels, dtype) -> dict:
    """Relative error vs the jnp reference and a timing per prefix kernel (causal 8k block)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax.parallel import kernels as K

    res = {}
    for kern in kernels:
        row = {"kernel": kern}
        try:
            errs = []
            for causal, (t, s) in ((True, (512, 512)), (False, (256, 512))):
                kq, kk, kv = jax.random.split(jax.random.key(int(time.time() * 1e3) % 2**31), 3)
                q = jax.random.normal(kq, (2, t, 8, 128), jnp.float32).astype(dtype)
                k = jax.random.normal(kk, (2, 2, s, 128), jnp.float32).astype(dtype)
                v = jax.random.normal(kv, (2, 2, s, 128), jnp.float32).astype(dtype)
                ql = jnp.asarray([t, t // 3], jnp.int32)
                kl = ql if causal else jnp.asarray([s, s // 2 + 7], jnp.int32)
                f = jax.jit(
                    lambda *a, kern=kern, causal=causal: K.prefix_attention(*a, causal=causal, implementation=kern)
                )
                out, lse = f(q, k, v, ql, kl)
                ref, rlse = jax.jit(
                    lambda *a, causal=causal: K.prefix_attention(*a, causal=causal, implementation="reference")
                )(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), ql, kl)
                valid = np.arange(t)[None, :] < np.asarray(ql)[:, None]
                d = np.where(valid[..., None, None], np.asarray(out, np.float32) - np.asarray(ref), 0)
                r = np.where(valid[..., None, None], np.asarray(ref), 0)
                le = np.where(valid[..., None], np.asarray(lse) - np.where(valid[..., None], np.asarray(rlse), 0), 0)
                errs.append((float(np.linalg.norm(d) / np.linalg.norm(r)), float(np.max(np.abs(le)))))
            row["rel_err"] = max(e[0] for e in errs)
            row["lse_err"] = max(e[1] for e in errs)
            row["ok"] = row["rel_err"] < 2e-2 and row["lse_err"] < 2e-2
            t = 8192 if jax.default_backend() == "gpu" else 256
            q = jax.random.normal(jax.random.key(3), (1, t, 32, 128), jnp.float32).astype(dtype)
            k = jax.random.normal(jax.random.key(4), (1, 8, t, 128), jnp.float32).astype(dtype)
            lens = jnp.asarray([t], jnp.int32)
            f = jax.jit(lambda q, k: K.prefix_attention(q, k, k, lens, lens, causal=True, implementation=kern)[0])
            f(q, k).block_until_ready()
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                f(q, k).block_until_ready()
                ts.append(time.perf_counter() - t0)
            row["ms_8k_causal"] = 1e3 * sorted(ts)[2]
            row["tflops"] = K.attention_flops(1, t, t, 32, 128, True) / (row["ms_8k_causal"] * 1e-3) / 1e12
        except Exception as err:
            row["ok"] = False
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        res[kern] = row
        log({"what": "kernel_check", **row})
    return res


def time_prefill(cfg, params, n_dev, length, policy_spec, kernel, reps, dtype) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax.parallel import Plan, make_mesh, prefill
    from kvjax.policies import parse_policy

    mesh = make_mesh(seq=n_dev, devices=jax.devices()[:n_dev])
    plan = Plan(mesh, prefix_implementation=kernel)
    pol = parse_policy(policy_spec)
    row = {
        "what": "prefill",
        "model": cfg.name,
        "devices": n_dev,
        "tokens": length,
        "policy": policy_spec,
        "kernel": kernel,
        "device_kind": jax.devices()[0].device_kind,
    }
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, length)), jnp.int32)
    lengths = jnp.asarray([length], jnp.int32)
    kw = dict(plan=plan, config=cfg, policy=pol, max_new_tokens=0, dtype=dtype)
    t0 = time.perf_counter()
    lowered = prefill.lower(params, tokens, lengths, **kw)
    row["lower_s"] = time.perf_counter() - t0
    log({"what": "stage", "stage": "lowered", "lower_s": row["lower_s"]})
    compiled = lowered.compile()
    row["compile_s"] = time.perf_counter() - t0 - row["lower_s"]
    try:
        m = compiled.memory_analysis()
        per_dev = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
        row["mem_per_device_gb"] = per_dev / 2**30
        param_b = sum(x.nbytes for x in jax.tree.leaves(params))  # replicated: one copy per device
        row["param_gb_per_device"] = param_b / 2**30
        cap = jax.devices()[0].memory_stats().get("bytes_limit") if jax.devices()[0].platform == "gpu" else None
        if cap:
            row["device_limit_gb"] = cap / 2**30
            per_tok = (per_dev - param_b) / length
            row["fits_tokens_est"] = int((cap - param_b) / per_tok)
    except Exception as err:
        row["mem_error"] = str(err)[:200]
    log({**row, "what": "compiled"})  # memory numbers survive a run that is cut off
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        logits, state = compiled(params, tokens, lengths)
        jax.block_until_ready((logits, state))
        dt = time.perf_counter() - t0
        if i == 0:
            row["first_call_s"] = dt
            row["kv_gb"] = state.nbytes / 2**30
            row["logits_finite"] = bool(jnp.all(jnp.isfinite(logits)))
        else:
            times.append(dt)
        del logits, state
    row["prefill_s"] = float(np.median(times)) if times else row["first_call_s"]
    row["tokens_per_s"] = length / row["prefill_s"]
    return row


def cmd_run(args) -> None:
    if os.environ.get("RING_BENCH_SMOKE"):  # CPU dry run of a GPU plan: tiny model, short prompts
        args.cpu_devices = 4
        args.rows = [f"tiny@{r.split('@')[1]}@{min(int(r.split('@')[2]), 512)}@{r.split('@', 3)[3]}" for r in args.rows]
    if args.cpu_devices:
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.cpu_devices}"
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kvjax.parallel import make_mesh

    deadline = time.monotonic() + args.budget
    dtype = jnp.dtype(args.dtype)
    log(
        {
            "what": "env",
            "jax": jax.__version__,
            "devices": [d.device_kind for d in jax.devices()],
            "job": args.job,
            "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
    )
    kernel = args.kernel
    if args.check_kernels:
        res = check_kernels(["cudnn"] if jax.default_backend() == "gpu" else ["reference"], dtype)
        if not any(r.get("ok") for r in res.values()) and jax.default_backend() == "gpu":
            res.update(check_kernels(["pallas"], dtype))
        good = [r for r in res.values() if r.get("ok")]
        kernel = min(good, key=lambda r: r["ms_8k_causal"])["kernel"] if good else "reference"
        log({"what": "kernel_choice", "kernel": kernel})
    for item in args.rows:
        model, n_dev, length, spec = item.split("@")
        n_dev, length = int(n_dev), int(length)
        if time.monotonic() > deadline:
            log({"what": "skipped", "row": item, "reason": "job deadline"})
            continue
        cfg = model_config(model)
        mesh = make_mesh(seq=n_dev, devices=jax.devices()[:n_dev])
        try:
            params = random_params(cfg, NamedSharding(mesh, P()), dtype)
            jax.block_until_ready(params)
            log({"what": "stage", "stage": "params", "row": item})
            log(time_prefill(cfg, params, n_dev, length, spec, kernel, args.reps, dtype))
        except Exception as err:
            log(
                {
                    "what": "prefill",
                    "model": cfg.name,
                    "devices": n_dev,
                    "tokens": length,
                    "policy": spec,
                    "kernel": kernel,
                    "error": f"{type(err).__name__}: {str(err)[:400]}",
                }
            )
        finally:
            params = None


PLAN_X4 = {
    # job: (CUDA_VISIBLE_DEVICES, rows "model@gpus@tokens@policy", check kernels)
    "a1": ("0", ["llama3.1-8b@1@131072@dense", "smollm2@1@131072@dense"], True),
    "a2": ("1,2", ["llama3.1-8b@2@131072@dense", "smollm2@2@131072@dense"], True),
    "a3": ("3", ["llama3.1-8b@1@131072@kivi:bits=2", "smollm2@1@32768@dense"], True),
    "b4": (
        "0,1,2,3",
        [
            "llama3.1-8b@4@131072@dense",
            "llama3.1-8b@4@131072@kivi:bits=2",
            "smollm2@4@131072@dense",
            "smollm2@4@524288@dense",
            "smollm2@4@32768@dense",
            "llama3.1-8b@4@262144@dense",
        ],
        True,
    ),
}


def cmd_gpu_x4(args) -> None:
    """Phase A: jobs a1, a2, a3 at once on disjoint GPUs; phase B: job b4 on all four."""
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", XLA_PYTHON_CLIENT_MEM_FRACTION="0.94", PYTHONUNBUFFERED="1")
    t0 = time.monotonic()

    def start(job, budget):
        vis, rows, check = PLAN_X4[job]
        cmd = [sys.executable, __file__, "run", "--job", job, "--budget", str(budget), "--reps", str(args.reps)]
        cmd += ["--check-kernels"] if check else []
        return subprocess.Popen(
            cmd + ["--rows", *rows],
            env=dict(env, CUDA_VISIBLE_DEVICES=vis),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def finish(procs, limit):
        for job, p in procs.items():
            try:
                out, _ = p.communicate(timeout=max(5.0, limit - (time.monotonic() - t0)))
            except subprocess.TimeoutExpired:
                p.kill()
                out, _ = p.communicate()
                print(f"job {job}: killed at the phase limit", flush=True)
            rows = [ln for ln in out.splitlines() if ln.startswith("ROW ")]
            _ALL.extend(rows)
            if os.environ.get("OUT"):
                with open(os.path.join(os.environ["OUT"], f"job_{job}.log"), "w") as f:
                    f.write(out)
            print(f"job {job} done at {time.monotonic() - t0:.0f} s, exit {p.returncode}", flush=True)
            if p.returncode:
                print(f"job {job} exited {p.returncode}; tail:\n" + "\n".join(out.splitlines()[-15:]), flush=True)

    phase_a = args.budget * 0.45
    finish({j: start(j, phase_a - 25) for j in ("a1", "a2", "a3")}, phase_a + 20)
    left = args.budget - (time.monotonic() - t0)
    finish({"b4": start("b4", left - 30)}, args.budget)
    print(f"total {time.monotonic() - t0:.0f} s", flush=True)
    summary(_ALL)


_ALL: list = []


def summary(lines) -> None:
    """Compact table of the prefill rows (the full rows are above and in $OUT)."""
    print("model | gpus | tokens | policy | kernel | compile s | prefill s | tok/s | GB/dev | fits (est.) | error")
    for ln in lines:
        r = json.loads(ln[4:])
        if r.get("what") != "prefill":
            continue
        print(
            f"{r['model']} | {r['devices']} | {r['tokens']} | {r['policy']} | {r.get('kernel')} | "
            f"{r.get('compile_s', 0):.1f} | {r.get('prefill_s', float('nan')):.3f} | {r.get('tokens_per_s', 0):.0f} | "
            f"{r.get('mem_per_device_gb', float('nan')):.1f} | {r.get('fits_tokens_est', '')} | "
            f"{r.get('error', '')[:80]}",
            flush=True,
        )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--rows", nargs="+", required=True, help="model@devices@tokens@policy")
    r.add_argument("--budget", type=float, default=600.0)
    r.add_argument("--reps", type=int, default=1)
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--kernel", default="cudnn", help="prefix kernel when --check-kernels is off")
    r.add_argument("--check-kernels", action="store_true")
    r.add_argument("--cpu-devices", type=int, default=0)
    r.add_argument("--job", default="")
    g = sub.add_parser("gpu-x4")
    g.add_argument("--budget", type=float, default=300.0)
    g.add_argument("--reps", type=int, default=1)
    args = ap.parse_args(argv)
    cmd_run(args) if args.cmd == "run" else cmd_gpu_x4(args)


if __name__ == "__main__":
    main()
