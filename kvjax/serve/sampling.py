"""Per-row sampling for a batch of independent requests.

`kvjax.sampling.Sampler` is a static argument (one temperature / top-k / top-p for a whole
batch, so a new setting compiles a new loop). A serving batch mixes requests with their own
settings, so here they are arrays [B] and one compiled step serves them all. Row b:

- temperature[b] == 0: greedy argmax (the same token `Sampler()` picks);
- else softmax(logits / temperature) restricted to the top_k[b] most likely tokens (0 = all),
  then to the smallest set whose mass reaches top_p[b] (1 = all), as `Sampler` does,
  sampled with the row's own key keys[b].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample_rows(logits, keys, temperature, top_k, top_p) -> jax.Array:
    """logits [B, V] float32; keys [B] PRNG keys; temperature, top_p [B] float32; top_k [B]
    int32. Returns tokens [B] int32."""
    _, v = logits.shape
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    t = jnp.where(temperature > 0, temperature, 1.0).astype(jnp.float32)
    x = logits / t[:, None]
    ranked = -jnp.sort(-x, axis=-1)  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    x = jnp.where(x < kth, -jnp.inf, x)
    ranked = jnp.where(jnp.arange(v)[None, :] < k[:, None], ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least one token)
    cutoff_idx = jnp.sum(cum - probs < top_p[:, None], axis=-1, keepdims=True) - 1
    cutoff = jnp.take_along_axis(ranked, cutoff_idx, axis=-1)
    x = jnp.where(x < cutoff, -jnp.inf, x)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, x).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)
