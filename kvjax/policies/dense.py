"""The uncompressed cache: every token's K and V kept in full precision."""

from __future__ import annotations

import dataclasses

from .base import Policy
from .registry import register

SLOT_MULTIPLE = 64


@register
@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Full KV cache [B, N, S, H] with S = prompt + max_new rounded up to a multiple of
    64 slots; the baseline every method is compared to."""

    name = "dense"

    def prefill_capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        # The GPU decode kernel reads the cache in blocks of 16-64 slots; a capacity that is not a
        # multiple of the block sends every decode step to the jnp reference attention instead.
        return -(-(prompt_len + max_new_tokens) // SLOT_MULTIPLE) * SLOT_MULTIPLE
