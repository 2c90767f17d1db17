"""Token orders that balance causal attention over a ring of `n` shards.

The sequence is cut into equal pieces and shard i holds a contiguous block of the
*reordered* sequence:

- "zigzag": 2n chunks; shard i holds chunks i and 2n-1-i (Brandon et al. 2023, "Striped
  Attention" / the zigzag of ring-flash-attention). Every shard then does the same
  causal work, and whole key blocks are provably invisible, so the ring skips them.
- "striped": token j goes to shard j mod n (Striped Attention). Balanced, no skipping.
- "contiguous": shard i holds tokens [i*T/n, (i+1)*T/n). Unbalanced under causality.

Because attention visibility is decided by positions (kvjax.attention), any order is
exact; the order only changes the work per shard. Orders are numpy index arrays (static).
"""

from __future__ import annotations

import numpy as np

LAYOUTS = ("zigzag", "striped", "contiguous")


def multiple_for(layout: str, n: int) -> int:
    """The sequence length must be a multiple of this for `layout` over n shards."""
    check_layout(layout)
    return 2 * n if layout == "zigzag" else n


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}; expected one of {LAYOUTS}")


def ring_order(length: int, n: int, layout: str = "zigzag") -> np.ndarray:
    """Permutation p [length] with reordered[j] = original[p[j]]; shard i owns the
    contiguous slice j in [i*length/n, (i+1)*length/n). Raises ValueError when `length`
    is not a multiple of `multiple_for(layout, n)`."""
    m = multiple_for(layout, n)
    if length % m:
        raise ValueError(f"sequence length {length} must be a multiple of {m} for layout={layout!r} over {n} shards")
    idx = np.arange(length)
    if layout == "contiguous":
        return idx
    if layout == "striped":
        return idx.reshape(length // n, n).T.reshape(-1)
    chunks = idx.reshape(2 * n, length // (2 * n))
    order = [c for i in range(n) for c in (i, 2 * n - 1 - i)]
    return chunks[order].reshape(-1)


def inverse_order(order: np.ndarray) -> np.ndarray:
    """q with original[j] = reordered[q[j]]."""
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)
    return inv


def padded_length(length: int, n: int, layout: str = "zigzag", minimum: int = 1) -> int:
    """Smallest multiple of `multiple_for(layout, n)` that is >= max(length, minimum)."""
    m = multiple_for(layout, n)
    return max(m, -(-max(length, minimum) // m) * m)
