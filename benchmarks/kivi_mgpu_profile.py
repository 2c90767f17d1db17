"""One Mosaic GPU KIVI-2 decode call at the benchmark shape (B8 Hq32 Hkv8 D128, 128k, with the
benchmark's 128-token residual window; argv[1] = the group G, default 32) on random codes, for
Nsight Compute / Nsight Systems. With --hlo, prints the operations of the compiled call instead
(what XLA launches besides the Pallas kernel). For example:

    ncu --target-processes all -k regex:mosaic -c 1 --section LaunchStats --section Occupancy \\
        --section WarpStateStats --section InstructionStats python3 benchmarks/kivi_mgpu_profile.py 32

PTX and ptxas reports: MOSAIC_GPU_DUMP_PTX=1 MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=DIR."""

import sys

import jax
import jax.numpy as jnp

from kvjax.pallas_kernels import kivi_mgpu as mg

argv = [a for a in sys.argv[1:] if not a.startswith("--")]
bits, gk = 2, int(argv[0]) if argv else 32
b, nq, n, s, h, r = 8, 32, 8, 131072, 128, 128
ks = jax.random.split(jax.random.key(0), 9)
w = 64 * h * bits // 32
fr = mg.KiviFragments(
    jax.random.bits(ks[0], (b, n, s // 64, 2, w), jnp.uint32),
    (jax.random.uniform(ks[1], (b, n, s // gk, 2, h)) * 0.1).astype(jnp.bfloat16),
    (jax.random.uniform(ks[4], (b, n, s // 64, 2, 64, h // gk)) * 0.1).astype(jnp.bfloat16),
)
q = jax.random.normal(ks[6], (b, 1, nq, h), jnp.bfloat16)
kr = jax.random.normal(ks[7], (b, n, r, h), jnp.bfloat16)
f = jax.jit(
    lambda q, fr, kr: mg.quantized_decode_attention_mgpu(
        q, fr, jnp.full((b,), s, jnp.int32), bits=bits, k_res=kr, v_res=kr, res_lengths=jnp.full((b,), r, jnp.int32)
    )
)
if "--hlo" in sys.argv:
    text = f.lower(q, fr, kr).compile().as_text()
    entry = text[text.index("ENTRY") :]
    print("\n".join(ln.strip()[:220] for ln in entry.splitlines()[1:]))
else:
    for _ in range(20):
        out = f(q, fr, kr)
    jax.block_until_ready(out)
    print("done")
