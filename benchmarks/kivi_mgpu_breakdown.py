"""Where the Hopper KIVI decode call spends its time (B8 Hq32 Hkv8 D128, 128k, KIVI-2): the whole
call against cuDNN's bf16 dense decode (with the default and with 16 splits, and with the KIVI
policy's 192-slot window), then its parts timed alone: the Pallas kernel's partials, the Triton
merge, the XLA epilogue (`assemble`) and the XLA residual window. Prints a table; run on a Hopper
GPU:

    source benchmarks/gpu_env.sh && python3 benchmarks/kivi_mgpu_breakdown.py [G ...] [--trace]

--trace: the whole-call rows, then the GPU time of every kernel of one call (a jax.profiler trace).
The rows that time a small part alone (the merge, the epilogue, the residual window) are bound by
the host's dispatch of one call (tens of microseconds): for those parts the trace is the measure.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp


def bench(fn, *args):
    """Median ms of 30 asynchronously queued calls (`kernels_bench._bench_jax`)."""
    from kernels_bench import _bench_jax  # benchmarks/ is this script's folder

    return _bench_jax(fn, *args, n=30, reps=7)[0]


def kernel_times(fn, *args, calls=20):
    """GPU time per kernel name (us per call) over `calls` calls, from a jax.profiler trace."""
    import glob
    import gzip
    import json
    import tempfile
    from collections import defaultdict

    jax.block_until_ready(fn(*args))
    d = tempfile.mkdtemp()
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
    with gzip.open(path) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    pids = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    total = defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and "GPU" in pids.get(e.get("pid"), ""):
            total[e["name"][:60]] += e.get("dur", 0) / calls
    if not total:
        print("no GPU events; processes in the trace:", sorted(pids.values()))
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def main(groups):
    from kvjax.pallas_kernels import kivi_mgpu as mg
    from kvjax.pallas_kernels.kivi_mgpu import kernel

    b, nq, n, s, h, r, bits = 8, 32, 8, 131072, 128, 128, 2
    ks = jax.random.split(jax.random.key(0), 9)
    q = jax.random.normal(ks[6], (b, 1, nq, h), jnp.bfloat16)
    kd, vd = (jax.random.normal(k, (b, s, n, h), jnp.bfloat16) for k in ks[7:9])
    rows = [
        (
            "cuDNN bf16 dense",
            bench(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")), q, kd, vd),
        )
    ]
    del kd, vd
    kr = jax.random.normal(ks[2], (b, n, r, h), jnp.bfloat16)
    lens = jnp.full((b,), s, jnp.int32)
    rl = jnp.full((b,), r, jnp.int32)
    for gk in groups:
        w = 64 * h * bits // 32
        fr = mg.KiviFragments(
            jax.random.bits(ks[0], (b, n, s // 64, 2, w), jnp.uint32),
            (jax.random.uniform(ks[1], (b, n, s // gk, 2, h)) * 0.1).astype(jnp.bfloat16),
            (jax.random.uniform(ks[4], (b, n, s // 64, 2, 64, h // gk)) * 0.1).astype(jnp.bfloat16),
        )
        variants = (mg.KiviMgpuBlockSizes(), mg.KiviMgpuBlockSizes(num_splits=16))
        for blocks in variants:
            full = jax.jit(
                lambda q, fr, kr, blocks=blocks: mg.quantized_decode_attention_mgpu(
                    q, fr, lens, bits=bits, k_res=kr, v_res=kr, res_lengths=rl, block_sizes=blocks
                )
            )
            rows.append((f"G{gk} full call {blocks}", bench(full, q, fr, kr)))
        kr192 = jnp.concatenate([kr, kr[:, :, :64]], axis=2)  # the KIVI policy's window at G=32: 3 chunks of 64
        full = jax.jit(
            lambda q, fr, kr: mg.quantized_decode_attention_mgpu(
                q, fr, lens, bits=bits, k_res=kr, v_res=kr, res_lengths=rl + 64
            )
        )
        rows.append((f"G{gk} full call, R=192", bench(full, q, fr, kr192)))
        if "--trace" in sys.argv:
            for blocks in variants:
                full = jax.jit(
                    lambda q, fr, kr, blocks=blocks: mg.quantized_decode_attention_mgpu(
                        q, fr, lens, bits=bits, k_res=kr, v_res=kr, res_lengths=rl, block_sizes=blocks
                    )
                )
                print(f"G{gk} {blocks}: GPU us per call by kernel:")
                for name, us in kernel_times(full, q, fr, kr).items():
                    print(f"    {us:9.2f}  {name}")
            continue
        bare = jax.jit(lambda q, fr: mg.quantized_decode_attention_mgpu(q, fr, lens, bits=bits))
        rows.append((f"G{gk} no residual window", bench(bare, q, fr)))
        blocks = mg.KiviMgpuBlockSizes().resolved(
            b=b, n=n, s=s, h=h, gk=gk, bits=bits, fold=mg.folds_scales(gk, h, bits)
        )
        qb, qr, rows_q, rows_p = mg.query_columns(q, n)
        kern = jax.jit(
            lambda qb, fr: kernel.kernel_partials(
                qb,
                fr,
                jnp.full((b, n), s, jnp.int32),
                bits=bits,
                gk=gk,
                gv=gk,
                rows_q=rows_p,
                scale=h**-0.5,
                block_sizes=blocks,
            )
        )
        rows.append((f"G{gk} kernel partials only", bench(kern, qb, fr)))
        parts = jax.block_until_ready(kern(qb, fr))
        asm = jax.jit(lambda parts: mg.assemble(parts, rows_q=rows_q, rows_p=rows_p, gv=gk, t=1, row_stride=16))
        rows.append((f"G{gk} XLA assemble only (no residual)", bench(asm, parts)))
        tri = jax.jit(
            lambda parts, qr, kr: mg.merge_partials(
                parts,
                qr,
                kr,
                kr,
                rl[:, None] + jnp.zeros((b, n), jnp.int32),
                rows_q=rows_q,
                rows_p=rows_p,
                gv=gk,
                t=1,
                scale=h**-0.5,
                row_stride=16,
            )
        )
        rows.append((f"G{gk} Triton merge only (with the residual)", bench(tri, parts, qr, kr)))
        res = jax.jit(
            lambda qr, kr: mg.residual_partial(
                qr, kr, kr, rl[:, None] + jnp.zeros((b, n), jnp.int32), t=1, scale=h**-0.5
            )
        )
        rows.append((f"G{gk} XLA residual window only", bench(res, qr, kr)))
    base = rows[0][1]
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| part | ms | x cuDNN |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.4f} | {base / ms:.2f} |")


if __name__ == "__main__":
    main([int(g) for g in sys.argv[1:] if not g.startswith("--")] or [32, 128])
