"""Where does the 8B-shaped decode step lose time against the roofline? (GPU diagnostic)

    python3 benchmarks/decode_diag.py 8192:1 32768:8 [--impls pallas,reference]

For each CONTEXT:BATCH: times the jitted decode loop (32 steps, best of 3) with each attention
`implementation` (the kernels, "pallas", and the jnp reference, "reference"), and reads the optimized HLO: cache-sized copies
inside the while-loop body (a per-step copy of the KV cache would double its traffic), copies
outside it (the undonated input state, once per call), conditionals in the loop body (each one a
device-to-host sync per step) and whether the decode kernel is in the program.
"""

import argparse
import re
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
import generate_bench as g
from benchmarks_common import random_params

from kvjax.generation import decode
from kvjax.models.presets import LLAMA3_1_8B as cfg
from kvjax.policies import Dense
from kvjax.sampling import Sampler


def hlo_facts(txt: str, shape: str) -> dict:
    comp, facts = None, {"loop copies": 0, "entry copies": 0, "loop conditionals": 0}
    bodies = set(re.findall(r"body=%?([\w.\-]+)", txt))
    for line in txt.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            comp = "ENTRY" if line.startswith("ENTRY") else line.split(" ")[0].lstrip("%")
        if shape in line and re.search(r"\bcopy\(", line):
            facts["entry copies" if comp == "ENTRY" else "loop copies"] += 1
        if comp in bodies and " conditional(" in line:
            facts["loop conditionals"] += 1
    facts["kernel"] = "sparse_decode_attention" in txt
    return facts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+", help="CONTEXT:BATCH")
    ap.add_argument("--impls", default="pallas,reference")
    ap.add_argument("--steps", type=int, default=33)
    a = ap.parse_args()
    print("device:", jax.devices()[0].device_kind, "jax", jax.__version__, flush=True)
    params = random_params(cfg, jnp.bfloat16)
    for spec in a.configs:
        ctx, b = map(int, spec.split(":"))
        state = g._filled_state(cfg, b, ctx, a.steps, jnp.bfloat16)
        logits = jnp.zeros((b, cfg.vocab_size), jnp.float32)
        shape = "bf16[" + ",".join(map(str, state.layers[0].k.shape)) + "]"
        for impl in a.impls.split(","):
            kw = dict(
                config=cfg,
                policy=Dense(),
                max_new_tokens=a.steps,
                sampler=Sampler(),
                stop_ids=(),
                dtype=jnp.bfloat16,
                implementation=impl,
            )
            compiled = decode.lower(params, state, logits, jax.random.key(0), **kw).compile()
            facts = hlo_facts(compiled.as_text(), shape)
            ts = []
            for _ in range(4):  # decode donates (deletes) its input state: a fresh one per call
                state = jax.block_until_ready(g._filled_state(cfg, b, ctx, a.steps, jnp.bfloat16))
                t = time.perf_counter()
                jax.block_until_ready(compiled(params, state, logits, jax.random.key(0)))
                ts.append(time.perf_counter() - t)
            ts = ts[1:]
            print(f"ctx={ctx} B={b} impl={impl}: {1000 * min(ts) / (a.steps - 1):.2f} ms/step; {facts}", flush=True)
            del compiled
        del state


if __name__ == "__main__":
    main()
