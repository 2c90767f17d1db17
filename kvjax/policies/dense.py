"""The uncompressed cache: every token's K and V kept in full precision."""

from __future__ import annotations

import dataclasses

from .base import Policy
from .registry import register
from .slots import aligned


@register
@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Full KV cache [B, N, S, H] with S = prompt + max_new rounded up to a multiple of
    64 slots; the baseline every method is compared to."""

    name = "dense"

    def prefill_capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        # rounded up to `slots.SLOT_MULTIPLE`, the capacity the GPU decode kernel reads in place
        return aligned(prompt_len + max_new_tokens, always=True)
