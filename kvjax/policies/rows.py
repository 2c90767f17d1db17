"""Row operations on whole KV states: broadcast, take, set, reset, merge, roll back.

Sessions, APE, BatchLLM prefix sharing, speculative decoding and serving move rows of a
state around rather than recomputing them. Every function here is pure (a new state comes
back, the input is never written) and works on any policy's state, because every array leaf
of every layer state type is batch-first ([B, ...]) except scalar write offsets (`fill`).
Positions ride along with the slots, so broadcast, merged and reset rows need no masks.

    rows.broadcast_rows(state, 16)          # one row -> 16 identical rows
    rows.take_rows(state, [0, 2])           # rows 0 and 2
    rows.set_rows(state, [3], other)        # other's single row into row 3
    rows.reset_rows(state, [False, True])   # row 1 emptied (positions -1, everything else 0)
    rows.merge_rows(state)                  # every row's slots side by side in one row
    rows.truncate_state(policy, state, lengths)   # = policy.truncate(state, lengths)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..state import KVState, SlotKV


def _leaf_name(path) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "name", getattr(last, "key", "")))


def _batch(tree) -> int:
    if isinstance(tree, KVState):
        return int(tree.lengths.shape[0])
    for leaf in jax.tree_util.tree_leaves(tree):
        if leaf.ndim:
            return int(leaf.shape[0])
    raise ValueError("the state has no batch-first leaf to read its row count from")


def per_row_fill(tree, batch: int | None = None):
    """The same state with every scalar write offset (`fill`) broadcast to [B], so rows can be
    written, rolled back and reset one by one."""
    b = _batch(tree) if batch is None else batch

    def f(path, x):
        if _leaf_name(path) == "fill" and jnp.ndim(x) == 0:
            return jnp.broadcast_to(x, (b,)).astype(jnp.int32)
        return x

    return jax.tree_util.tree_map_with_path(f, tree)


def broadcast_rows(tree, batch: int):
    """A one-row state (every batch-first leaf [1, ...]) repeated to `batch` rows (new arrays;
    scalar leaves are kept). Raises ValueError for a state with more than one row."""
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch={batch!r} must be an integer >= 1")
    rows = _batch(tree)
    if rows != 1:
        raise ValueError(f"broadcast_rows takes a one-row state; this one has {rows} rows")

    def f(x):
        if jnp.ndim(x) == 0:
            return x
        return jnp.repeat(x, batch, axis=0)

    return jax.tree_util.tree_map(f, tree)


def take_rows(tree, rows):
    """The rows `rows` (indices, any order, repeats allowed) of a state."""
    idx = jnp.asarray(rows, jnp.int32)
    if idx.ndim != 1:
        raise ValueError(f"rows={rows!r} must be a 1-D sequence of row indices")
    return jax.tree_util.tree_map(lambda x: x if jnp.ndim(x) == 0 else x[idx], tree)


def set_rows(tree, rows, src):
    """`tree` with rows `rows` replaced by the rows of `src` (same state type and shapes except
    the batch: src has len(rows) rows). Write offsets become per row where either side's is."""
    idx = jnp.asarray(rows, jnp.int32)
    b = _batch(tree)
    tree, src = per_row_fill(tree, b), per_row_fill(src, int(idx.shape[0]))
    if jax.tree_util.tree_structure(tree) != jax.tree_util.tree_structure(src):
        raise ValueError("set_rows: the source state's structure differs from the target's")

    def f(x, y):
        if x.shape[1:] != y.shape[1:] or y.shape[0] != idx.shape[0]:
            raise ValueError(f"set_rows: source leaf {y.shape} does not fit rows {list(np.asarray(idx))} of {x.shape}")
        return x.at[idx].set(y.astype(x.dtype))

    return jax.tree_util.tree_map(f, tree, src)


def reset_rows(tree, mask):
    """Empty the rows where mask [B] is set: every leaf named like a position (`pos`,
    `res_pos`, `sink_pos`, ...) becomes -1, every other leaf 0 (K/V, counters, write offsets,
    `KVState.lengths`). The row then holds nothing and attends to nothing until new tokens
    are written; a policy that sizes its rows at prefill (budgets) needs a prefill to refill it."""
    mask = jnp.asarray(mask, bool)
    tree = per_row_fill(tree, int(mask.shape[0]))

    def f(path, x):
        if jnp.ndim(x) == 0:
            return x
        if x.shape[0] != mask.shape[0]:
            raise ValueError(f"reset_rows: mask of {mask.shape[0]} rows for a leaf of {x.shape[0]} rows")
        empty = -1 if _leaf_name(path).endswith("pos") else 0
        m = mask.reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.where(m, jnp.asarray(empty, x.dtype), x)

    return jax.tree_util.tree_map_with_path(f, tree)


def merge_slots(state: SlotKV, headroom: int = 0) -> SlotKV:
    """Every row's slots side by side in one row: [B, N, S, H] -> [1, N, B*S (+ headroom), H],
    `fill` = B*S. Positions ride along (rows encoded at the same positions, as APE does, keep
    them), so attention over the merged row needs no mask."""
    b, n, s, _ = state.k.shape

    def flat(x):
        x = jnp.moveaxis(x, 0, 1)  # [N, B, S, ...]
        return x.reshape((1, n, b * s) + x.shape[3:])

    k, v, pos = flat(state.k), flat(state.v), flat(state.pos)
    if headroom:
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, headroom), (0, 0))) for x in (k, v))
        pos = jnp.pad(pos, ((0, 0), (0, 0), (0, headroom)), constant_values=-1)
    return SlotKV(k=k, v=v, pos=pos, fill=jnp.asarray(b * s, jnp.int32))


def merge_rows(state: KVState, headroom: int = 0) -> KVState:
    """A state whose layers are slot caches (`SlotKV`, what dense and the non-evicting eviction
    policies decode on) merged into one row (`merge_slots` per layer); lengths = the longest
    row's. Raises ValueError for other layer state types (quantized streams hold per-row
    counts that do not concatenate)."""
    for i, layer in enumerate(state.layers):
        if not isinstance(layer, SlotKV):
            raise ValueError(f"merge_rows needs slot caches (SlotKV); layer {i} is a {type(layer).__name__}")
    layers = tuple(merge_slots(layer, headroom) for layer in state.layers)
    return KVState(layers=layers, lengths=jnp.max(state.lengths, keepdims=True))


def check_lengths(state: KVState, lengths) -> jax.Array:
    """`lengths` as int32 [B]; when concrete, checked against the state's rows and lengths."""
    b = state.lengths.shape[0]
    if isinstance(lengths, jax.core.Tracer):
        if lengths.shape != (b,):
            raise ValueError(f"lengths of shape {lengths.shape} for a state of {b} rows; expected ({b},)")
        return lengths.astype(jnp.int32)
    arr = np.asarray(lengths)
    if arr.shape != (b,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lengths={lengths!r} must be {b} integers (one per row)")
    if not isinstance(state.lengths, jax.core.Tracer):
        have = np.asarray(state.lengths)
        if (arr < 0).any() or (arr > have).any():
            raise ValueError(f"lengths={arr.tolist()} must lie in [0, tokens seen per row = {have.tolist()}]")
    return jnp.asarray(arr, jnp.int32)


def truncate_state(policy, state: KVState, lengths) -> KVState:
    """`policy.truncate(state, lengths)`: every layer rolled back with `policy.truncate_layer`,
    `lengths` the new per-row token counts (at most the current ones)."""
    lengths = check_lengths(state, lengths)
    # A row kept whole drops nothing: its layers get the largest length, so no layer type has
    # to tell "nothing to drop" from "drop what I cannot see" (quantized streams keep no positions).
    cut = jnp.where(lengths >= state.lengths, jnp.iinfo(jnp.int32).max, lengths)
    layers = tuple(policy.truncate_layer(layer, cut) for layer in state.layers)
    return KVState(layers=layers, lengths=jnp.minimum(state.lengths, lengths))
