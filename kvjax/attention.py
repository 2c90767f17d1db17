"""The one attention entry point every model layer and policy goes through: `attend`.

Layouts (kvjax-wide):
    q      [B, T, Nq, H]   new queries (post-RoPE)
    k, v   [B, N, S, H]    cache slots, heads-major (N = num_kv_heads, Nq = N * G)
    q_pos  [B, T]  int32   absolute position of each query (-1 = padding)
    k_pos  [B, N, S] int32 absolute position held by each slot (-1 = empty)

A slot is visible to a query when 0 <= k_pos <= q_pos (and q_pos - k_pos < window for
local attention). Because visibility is decided by positions, evicted, merged and
re-ordered caches need no special masks.

`implementation=` says which code computes it, everywhere in kvjax (`attend`, `LayerContext`,
`generate`, the evaluation functions, `kvjax.parallel`):
    "auto" (or None)  "pallas" on GPU and TPU, "reference" on CPU (`default_implementation`);
    "reference"       the exact jnp attention (`kvjax.attention_reference`);
    "pallas"          the Pallas kernels where the cache and shapes allow them, the reference
                      elsewhere (`kvjax.attention_kernels`; on CPU they run in interpret mode);
    a function        with `attention_reference`'s signature, returning `AttentionOutput`
                      (how `kvjax.parallel` routes a layer's attention through ring attention).
The named ones are the entries of one table, `IMPLEMENTATIONS`. Inside the kernels, which
Pallas lowering runs ("mosaic_gpu", "triton", "mosaic_tpu") is their own `backend=` knob
(`kvjax.pallas_kernels._compat`). The old name "xla" for the reference still works, with a
DeprecationWarning. Where "pallas" runs the reference instead (shapes or dtypes no kernel takes),
the call is counted with its reason at trace time: `fallbacks()` returns the counts,
`reset_fallbacks()` clears them, and the "kvjax.attention" logger reports each one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax

from .attention_kernels import fallbacks, kernel_backend, pallas_attention, record_fallback, reset_fallbacks
from .attention_reference import (
    MASK_VALUE,
    AttentionOutput,
    attention_logits,
    attention_probs,
    attention_reference,
    merge_partials,
    visibility_mask,
)

#: name -> attention function (q, k, v, q_pos, k_pos, *, window, scale, want_mass) -> AttentionOutput
IMPLEMENTATIONS: dict[str, Callable[..., AttentionOutput]] = {
    "reference": attention_reference,
    "pallas": pallas_attention,
}
AUTO = "auto"
RENAMED = {"xla": "reference"}  # old spelling -> new one, accepted with a DeprecationWarning


def default_implementation() -> str:
    """What "auto" means on the default device: "pallas" on GPU and TPU, "reference" on CPU."""
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "reference"


def resolve_implementation(implementation: str | Callable | None, strict: bool = True) -> str | Callable:
    """An `implementation=` argument (module doc) -> a key of `IMPLEMENTATIONS` or a function;
    raises ValueError for an unknown name, or with strict=False returns it as is (a name that
    another dispatcher knows: `kvjax.quant.register_quantized_kernel`)."""
    if implementation is None or implementation == AUTO:
        return default_implementation()
    if callable(implementation):
        return implementation
    if implementation in RENAMED:
        new = RENAMED[implementation]
        warnings.warn(
            f"implementation={implementation!r} is deprecated; use implementation={new!r} (the jnp reference)",
            DeprecationWarning,
            stacklevel=3,
        )
        return new
    if strict and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"unknown attention implementation={implementation!r}; expected {AUTO!r}, one of "
            f"{sorted(IMPLEMENTATIONS)}, or an attention function"
        )
    return implementation


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    window: int | None = None,
    scale: float | None = None,
    want_mass: bool = False,
    implementation: str | Callable | None = None,
    prefix_cache: bool = False,
) -> AttentionOutput:
    """Attention of q [B, T, Nq, H] over cache slots k, v [B, N, S, H] (see module doc).

    prefix_cache: a promise that k_pos holds positions 0..len-1 in order in every (row, head)
    and q_pos is 0..T-1 (or -1): a kernel may then run without checking the layout on device
    (the check's fallback branch costs a GPU memory for the reference's score tiles and a
    device-to-host sync). A wrong promise gives wrong results; callers set it only for a prompt
    prefilled whole into an empty cache (`LayerContext.prefix_cache`).

    Returns `AttentionOutput(out [B, T, Nq, H], lse [B, T, Nq], key_mass [B, N, S] | None)`.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected q [B,T,Nq,H] and k/v [B,N,S,H]; got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k{k.shape} and v{v.shape} must agree on [B, N, S]")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q{q.shape} and k{k.shape} must agree on batch and head_dim")
    if q_pos.shape != q.shape[:2]:
        raise ValueError(f"q_pos{q_pos.shape} must be [B, T] = {q.shape[:2]}")
    if k_pos.shape != k.shape[:3]:
        raise ValueError(f"k_pos{k_pos.shape} must be [B, N, S] = {k.shape[:3]}")
    impl = resolve_implementation(implementation)
    fn = impl if callable(impl) else IMPLEMENTATIONS[impl]
    if prefix_cache and impl == "pallas":
        return fn(q, k, v, q_pos, k_pos, window=window, scale=scale, want_mass=want_mass, prefix_cache=True)
    return fn(q, k, v, q_pos, k_pos, window=window, scale=scale, want_mass=want_mass)


__all__ = [
    "AUTO",
    "IMPLEMENTATIONS",
    "MASK_VALUE",
    "AttentionOutput",
    "attend",
    "attention_logits",
    "attention_probs",
    "attention_reference",
    "default_implementation",
    "fallbacks",
    "kernel_backend",
    "merge_partials",
    "record_fallback",
    "reset_fallbacks",
    "resolve_implementation",
    "visibility_mask",
]
