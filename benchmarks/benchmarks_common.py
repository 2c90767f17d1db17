"""Pieces the benchmark scripts share."""

from __future__ import annotations


def random_params(cfg, dtype):
    """Random weights (normal(0.02)) for `cfg` in `dtype`, made on the default device by one
    small jitted generator per distinct shape (fast to compile, no host copy of the model)."""
    import jax
    import jax.numpy as jnp

    from kvjax.models import init_params

    shapes = jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))
    gens = {}

    def make(i, leaf):
        key = (leaf.shape, str(leaf.dtype))
        if key not in gens:
            gens[key] = jax.jit(lambda k, s=leaf.shape: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(dtype))
        return gens[key](jax.random.key(i))

    leaves, tree = jax.tree_util.tree_flatten(shapes)
    return jax.tree_util.tree_unflatten(tree, [make(i, l) for i, l in enumerate(leaves)])


def profile_summary(trace_dir: str, steps: int, top: int = 25) -> dict:
    """Read the newest `*.trace.json.gz` that `jax.profiler.trace(trace_dir)` wrote and
    summarise `steps` decode steps per device-side thread group: per operation name (digits and
    `.N` suffixes dropped, so one entry covers every layer's copy of it) the launches and
    microseconds per step, the busy time per step (sum of durations) and the span per step
    (first start to last end, over `steps`): span - busy is the time the device idled between
    launches. Groups: GPU stream threads ('Stream ...', the kernels), XLA's op thread ('XLA Ops',
    the HLO names) where present; on CPU, the XLA executor threads."""
    import collections
    import glob
    import gzip
    import json
    import os
    import re

    files = sorted(
        glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")), key=os.path.getmtime
    )
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}/plugins/profile")
    with gzip.open(files[-1]) as f:
        events = json.load(f)["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "thread_name"
    }

    def group(e):
        proc, thread = procs.get(e["pid"], ""), threads.get((e["pid"], e["tid"]), "")
        if "GPU" in proc or "TPU" in proc:
            if thread.startswith("Stream"):
                return "kernels"
            if thread.startswith("XLA Ops"):
                return "XLA ops"
            return None
        return "XLA ops (CPU)" if "XLA" in thread and "Client" not in thread else None

    out = {}
    by_group = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and (g := group(e)):
            by_group[g].append(e)
    for g, evs in by_group.items():
        per = collections.defaultdict(lambda: [0, 0.0])
        for e in evs:
            name = re.sub(r"(?:[._]\d+)+$", "", e["name"])
            per[name][0] += 1
            per[name][1] += float(e.get("dur", 0.0))
        busy = sum(float(e.get("dur", 0.0)) for e in evs)
        span = max(e["ts"] + e.get("dur", 0.0) for e in evs) - min(e["ts"] for e in evs)
        rows = sorted(per.items(), key=lambda kv: -kv[1][1])[:top]
        out[g] = {
            "launches/step": round(len(evs) / steps, 1),
            "busy us/step": round(busy / steps, 1),
            "span us/step": round(span / steps, 1),
            "top": [[n, round(c / steps, 2), round(d / steps, 1)] for n, (c, d) in rows],
        }
    return out


def print_profile(label: str, summary: dict) -> None:
    """The `profile_summary` tables as markdown."""
    for g, s in summary.items():
        print(
            f"\n{label} -- {g}: {s['launches/step']} launches, busy {s['busy us/step']} us, span {s['span us/step']} us per step"
        )
        print("| op | launches/step | us/step |\n|---|---|---|")
        for name, c, d in s["top"]:
            print(f"| {name[:80]} | {c} | {d} |")
