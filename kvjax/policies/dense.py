"""The uncompressed cache: every token's K and V kept in full precision."""

from __future__ import annotations

import dataclasses

from .base import Policy
from .registry import register


@register
@dataclasses.dataclass(frozen=True)
class Dense(Policy):
    """Full KV cache [B, N, prompt + max_new, H]; the baseline every method is compared to."""

    name = "dense"
