"""One Mosaic GPU KIVI-2 decode call at the benchmark shape (B8 Hq32 Hkv8 D128, 128k; argv[1] = the
group G, default 32) on random codes, for Nsight Compute (command in BENCHMARKS.md, "Decode")."""
import sys
import jax, jax.numpy as jnp
from kvjax.pallas_kernels import quantized_decode_attention_mgpu as mg

bits, gk = 2, int(sys.argv[1]) if len(sys.argv) > 1 else 32
b, nq, n, s, h, r = 8, 32, 8, 131072, 128, 128
ks = jax.random.split(jax.random.key(0), 9)
w = 64 * h * bits // 32
fr = mg.KiviFragments(jax.random.bits(ks[0], (b, n, s // 64, 2, w), jnp.uint32),
                      (jax.random.uniform(ks[1], (b, n, s // gk, 2, h)) * 0.1).astype(jnp.bfloat16),
                      (jax.random.uniform(ks[4], (b, n, s // 64, 2, h // gk, 64)) * 0.1).astype(jnp.bfloat16))
q = jax.random.normal(ks[6], (b, 1, nq, h), jnp.bfloat16)
f = jax.jit(lambda q, fr: mg.quantized_decode_attention_mgpu(q, fr, jnp.full((b,), s, jnp.int32), bits=bits))
jax.block_until_ready(f(q, fr))
jax.block_until_ready(f(q, fr))
print("done")
