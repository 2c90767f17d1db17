"""Token sampling: greedy, temperature, top-k, top-p (nucleus), with an explicit PRNG key."""

from __future__ import annotations

import dataclasses
import numbers

import jax
import jax.numpy as jnp


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """temperature 0 = greedy argmax. top_k 0 = off. top_p 1.0 = off.

    A frozen (hashable) dataclass: it is a static argument of the compiled decode loop, so
    a new temperature, top_k or top_p compiles a new loop. top_k / top_p only shape a
    sampled distribution, so they need temperature > 0."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not _real(self.temperature):
            raise TypeError(f"temperature={self.temperature!r} must be a number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool):
            raise TypeError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not _real(self.top_p):
            raise TypeError(f"top_p={self.top_p!r} must be a number in (0, 1] (1 = off)")
        if not self.temperature >= 0:  # also refuses nan
            raise ValueError(f"temperature={self.temperature} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.temperature == 0 and (self.top_k or self.top_p < 1.0):
            raise ValueError(
                f"top_k={self.top_k} / top_p={self.top_p} have no effect with temperature=0 (greedy decoding); "
                "set temperature > 0 to sample"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: jax.Array, key: jax.Array) -> jax.Array:
        """logits [B, V] float32 -> token ids [B] int32."""
        if self.temperature == 0.0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(key, self.shaped_logits(logits), axis=-1).astype(jnp.int32)

    def probs(self, logits: jax.Array) -> jax.Array:
        """logits [..., V] -> the distribution [..., V] float32 that `__call__` draws from:
        one-hot at the argmax when greedy, else softmax of the temperature-scaled logits with
        the top-k / top-p cut applied. Speculative decoding compares these (draft vs target)."""
        logits = logits.astype(jnp.float32)
        if self.temperature == 0.0:
            return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
        return jax.nn.softmax(self.shaped_logits(logits), axis=-1)

    def sample_and_probs(self, logits: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(token ids [...] int32 drawn as `__call__` draws them, `probs(logits)` [..., V])."""
        return self(logits, key), self.probs(logits)

    def shaped_logits(self, logits: jax.Array) -> jax.Array:
        """Sampled case (temperature > 0): logits / temperature with the tokens outside the top-k
        and the top-p nucleus set to -inf; categorical sampling from them is `__call__`."""
        if self.temperature == 0.0:
            raise ValueError("shaped_logits is the sampled case; temperature=0 decodes greedily (argmax)")
        logits = logits / self.temperature
        if self.top_k:
            kth = jax.lax.top_k(logits, min(self.top_k, logits.shape[-1]))[0][..., -1:]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        if self.top_p < 1.0:
            sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
            probs = jax.nn.softmax(sorted_logits, axis=-1)
            cum = jnp.cumsum(probs, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            cutoff_idx = jnp.sum(cum - probs < self.top_p, axis=-1, keepdims=True) - 1
            cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
            logits = jnp.where(logits < cutoff, -jnp.inf, logits)
        return logits
