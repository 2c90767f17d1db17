"""Where does the 8B-shaped decode step lose time against the roofline? (GPU diagnostic)

For one (context, batch): times the jitted decode loop with the kernel ("pallas") and the
XLA reference attention, and counts cache-sized copies inside the while-loop body of the
optimized HLO (a per-step copy of the KV cache would double its traffic).
"""

import re
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
import generate_bench as g  # noqa: E402

from kvjax.generate import decode  # noqa: E402
from kvjax.models.presets import LLAMA3_1_8B as cfg  # noqa: E402
from kvjax.policies import Dense  # noqa: E402
from kvjax.sampling import Sampler  # noqa: E402

ctx, b, new = int(sys.argv[1]), int(sys.argv[2]), 17
params = g._random_params(cfg, jnp.bfloat16)
state = g._filled_state(cfg, b, ctx, new, jnp.bfloat16)
logits = jnp.zeros((b, cfg.vocab_size), jnp.float32)
for impl in ("pallas", "xla"):
    kw = dict(config=cfg, policy=Dense(), max_new_tokens=new, sampler=Sampler(), stop_ids=(), dtype=jnp.bfloat16,
              implementation=impl)
    compiled = decode.lower(params, state, logits, jax.random.key(0), **kw).compile()
    txt = compiled.as_text()
    shape = f"bf16[{b},{cfg.num_kv_heads},{state.layers[0].k.shape[2]},{cfg.head_dim}]"
    copies = [l for l in txt.splitlines() if shape in l and re.search(r"\bcopy\(", l)]
    jax.block_until_ready(decode(params, state, logits, jax.random.key(0), **kw))
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        jax.block_until_ready(decode(params, state, logits, jax.random.key(0), **kw))
        ts.append(time.perf_counter() - t)
    print(f"ctx={ctx} B={b} impl={impl}: {1000 * min(ts) / (new - 1):.2f} ms/step; cache-shaped copies in HLO: "
          f"{len(copies)}; decode kernel in HLO: {'sparse_decode_attention' in txt}", flush=True)
    for l in copies[:4]:
        print("   ", l.strip()[:160])
