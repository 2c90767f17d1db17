"""A/B timings of the Hopper KIVI decode kernel (`pallas_kernels/kivi_mgpu`) at the decode
benchmark's shape (B8 Hq32 Hkv8 D128, 128k quantized tokens, a 128-token bf16 window): the working
tree's kernel, copies of other versions of `pallas_kernels/` (each a folder holding a package, e.g.
made with `git archive REV pallas_kernels | tar -x -C /tmp/rev` and renamed; versions before the
`kivi_mgpu` subpackage have the kernel in `quantized_decode_attention_mgpu.py`), and variants of
the tuning knobs (`KiviMgpuBlockSizes` fields; keyword arguments for old copies), each checked at
full size against the float32 reference, then timed against cuDNN's bf16 decode in interleaved
rounds (median of the rounds; each sample is `kernels_bench`'s: 30 queued calls, median of 5).
Prints a table with the registers and shared memory of each compiled kernel (Mosaic GPU's dumps).
Without --mods it times the working tree's kernel alone (BENCHMARKS.md, "Decode kernels").

    source benchmarks/gpu_env.sh
    git archive REV pallas_kernels | tar -x -C /tmp && mv /tmp/pallas_kernels /tmp/oldpk
    python3 benchmarks/kivi_mgpu_ab.py --path /tmp --mods oldpk --configs 2,32 4,32 \\
        --variant 'tps4={"tiles_per_step": 4, "stages": 2}'
"""

import argparse
import glob
import importlib
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_bench import _bench_jax, _lse_err, _rel, decode_cache

from kvjax.pallas_kernels import kivi_mgpu as tree
from kvjax.pallas_kernels import quantized_decode_attention as qda


def _kernel_module(package: str):
    """The Hopper KIVI kernel's module in a copy of pallas_kernels (the subpackage, or the single
    module of versions before it)."""
    try:
        return importlib.import_module(f"{package}.kivi_mgpu")
    except ImportError:
        return importlib.import_module(f"{package}.quantized_decode_attention_mgpu")


def _call(mod, q, fr, lens, kr, vr, rl, bits, kw):
    """The kernel of `mod` with tuning knobs `kw` (block_sizes where the module has them)."""
    if kw and hasattr(mod, "KiviMgpuBlockSizes"):
        kw = {"block_sizes": mod.KiviMgpuBlockSizes(**kw)}
    return mod.quantized_decode_attention_mgpu(q, fr, lens, bits=bits, k_res=kr, v_res=vr, res_lengths=rl, **kw)


def _resources(d):
    """'registers/shared bytes' from Mosaic GPU's dump folder of one compiled kernel."""
    out = ""
    for f in glob.glob(f"{d}/*.ptxas"):
        with open(f) as fh:
            m = re.search(r"Used (\d+) registers", fh.read())
        out += m.group(1) if m else "?"
    for f in glob.glob(f"{d}/*.resources.txt"):
        with open(f) as fh:
            m = re.search(r"smem_scratch_bytes=(\d+)", fh.read())
        out += f"/{m.group(1) if m else '?'}B"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", default=None, help="a folder holding other versions of pallas_kernels as packages")
    ap.add_argument("--mods", nargs="*", default=[], help="package names under --path to time beside the tree")
    ap.add_argument("--configs", nargs="*", default=["2,32", "2,128", "4,32", "4,128"], help="bits,G pairs")
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help='NAME={"knob": value} (KiviMgpuBlockSizes fields) for the tree\'s kernel, or NAME@MOD={...} for a copy',
    )
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.path:
        sys.path.insert(0, args.path)
    mods = {"tree": tree, **{m: _kernel_module(m) for m in args.mods}}
    variants = []
    for v in args.variant:
        name, kw = v.split("=", 1)
        name, _, mod = name.partition("@")
        variants.append((name, mods[mod or "tree"], json.loads(kw)))
    dump_root = tempfile.mkdtemp(prefix="kivi_ab_")
    print(jax.devices()[0].device_kind, jax.__version__, flush=True)
    b, nq, n, h, s, r = 8, 32, 8, 128, 131072, 128
    keys = jax.random.split(jax.random.key(1), 8)
    q = jax.random.normal(keys[0], (b, 1, nq, h), jnp.bfloat16)
    kd = jax.random.normal(keys[1], (b, s, n, h), jnp.bfloat16)
    vd = jax.random.normal(keys[2], (b, s, n, h), jnp.bfloat16)
    fns = {
        "cudnn": (jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")), (q, kd, vd))
    }
    res = {}
    for cfg in args.configs:
        bits, gk = map(int, cfg.split(","))
        kc, ksc, kz, vc, vsc, vz, kr, vr = decode_cache(keys, b, n, s, h, r, bits, gk, gk)
        lens, rl = jnp.full((b,), s, jnp.int32), jnp.full((b,), r, jnp.int32)
        cache = (kc, ksc, kz, vc, vsc, vz)
        ro, rlse = jax.jit(
            lambda *a, bits=bits: qda.quantized_decode_attention_reference(
                *a[:8], bits=bits, k_res=a[8], v_res=a[9], res_lengths=a[10]
            )
        )(q, *cache, lens, kr, vr, rl)
        frs = {m: jax.block_until_ready(mod.to_fragment_layout(*cache, bits=bits)) for m, mod in mods.items()}
        del kc, vc
        for vname, mod, kw in [(m, mod, {}) for m, mod in mods.items()] + variants:
            name = f"kivi{bits} G{gk} {vname}"
            fr = frs[next(m for m, x in mods.items() if x is mod)]
            d = os.path.join(dump_root, name.replace(" ", "_"))
            os.makedirs(d, exist_ok=True)
            os.environ["MOSAIC_GPU_DUMP_TO"] = d  # read when the kernel compiles
            try:
                fn = jax.jit(
                    lambda q, fr, lens, kr, vr, rl, mod=mod, kw=kw, bits=bits: _call(
                        mod, q, fr, lens, kr, vr, rl, bits, kw
                    )
                )
                out, lse = jax.block_until_ready(fn(q, fr, lens, kr, vr, rl))
            except Exception as e:
                print(f"{name}: ERROR {e!s:.800}", flush=True)
                continue
            finally:
                del os.environ["MOSAIC_GPU_DUMP_TO"]
            res[name] = _resources(d)
            print(f"{name}: rel={_rel(out, ro):.2e} lse={_lse_err(lse, rlse):.2e} regs/smem={res[name]}", flush=True)
            fns[name] = (fn, (q, fr, lens, kr, vr, rl))
        del ro, rlse
    times = {}
    for rd in range(args.rounds):
        for name, (fn, fargs) in fns.items():
            times.setdefault(name, []).append(_bench_jax(fn, *fargs, n=30, reps=5)[0])
        print(f"round {rd} done", flush=True)
    base = float(np.median(times["cudnn"]))
    print(f"\n| variant | ms (median of {args.rounds}) | rounds | x cuDNN | registers/shared memory |")
    print("|---|---|---|---|---|")
    for name, v in times.items():
        m = float(np.median(v))
        print(f"| {name} | {m:.4f} | {' '.join(f'{x:.4f}' for x in v)} | {base / m:.2f} | {res.get(name, '')} |")


if __name__ == "__main__":
    main()
