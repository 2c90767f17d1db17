"""Block attention with prefix-valid rows, the shape the zigzag ring produces.

In a zigzag ring over a right-padded prompt every block a shard computes is one of
  - the local causal block: query t sees key s <= t (same tokens, same order), or
  - a full block: every valid key is earlier than every valid query,
and in both the valid queries and keys of row b are a prefix of the block (lengths
q_len[b], kv_len[b]). Flash kernels that take per-row lengths serve those blocks without a
position mask. `implementation=` picks one of `PREFIX_IMPLEMENTATIONS`:
  "reference"  `kvjax.attention.attend(implementation="reference")` with positions synthesised
               from the lengths: the exact jnp attention (the CPU choice);
  "pallas"     kvjax's block-sparse flash kernel with `kv_lengths` (Mosaic GPU / Triton /
               Mosaic TPU; T and S multiples of its blocks);
  "cudnn"      cuDNN's flash attention through JAX (GPU, bf16/fp16).
The old names `kernel="xla"` (now "reference"), `kernel="pallas"` and `kernel="cudnn"` still
work, with a DeprecationWarning (`resolve_prefix_implementation`).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

from .. import attention
from ..pallas_kernels.block_mask import MaskSpec
from ..pallas_kernels.block_sparse_attention import block_sparse_attention

PREFIX_IMPLEMENTATIONS = ("reference", "pallas", "cudnn")
_RENAMED = {"xla": "reference"}


def resolve_prefix_implementation(
    implementation: str | None, kernel: str | None = None, *, name: str = "prefix_implementation", optional=False
):
    """The prefix-block implementation given as `name`= (`implementation`), or under its deprecated
    name `kernel=` (where "xla" meant "reference"), with a DeprecationWarning for the old names.
    optional=True lets it be None (the ring's positions schedule: no prefix kernel)."""
    if kernel is not None:
        if implementation is not None:
            raise ValueError(
                f"{name}={implementation!r} and kernel={kernel!r} were both given; pass only {name}= "
                f"(kernel= is its deprecated name)"
            )
        implementation = _RENAMED.get(kernel, kernel)
        warnings.warn(
            f"kernel={kernel!r} is deprecated; use {name}={implementation!r}", DeprecationWarning, stacklevel=3
        )
    elif implementation in _RENAMED:
        new = _RENAMED[implementation]
        warnings.warn(
            f"{name}={implementation!r} is deprecated; use {name}={new!r} (the jnp reference)",
            DeprecationWarning,
            stacklevel=3,
        )
        implementation = new
    if implementation is None and optional:
        return None
    if implementation not in PREFIX_IMPLEMENTATIONS:
        raise ValueError(f"{name}={implementation!r}; expected one of {PREFIX_IMPLEMENTATIONS}")
    return implementation


def prefix_attention(
    q,
    k,
    v,
    q_len,
    kv_len,
    *,
    causal: bool,
    scale: float | None = None,
    implementation: str = "reference",
    kernel: str | None = None,
):
    """q [B, T, Nq, H]; k, v [B, N, S, H]; q_len, kv_len [B] int32 (valid prefix sizes).

    causal=True: query t sees keys s <= t (requires T == S); else every valid key.
    implementation: one of `PREFIX_IMPLEMENTATIONS` (module doc); kernel: its deprecated name.
    Returns (out [B, T, Nq, H] in q.dtype, zero for invalid queries; lse [B, T, Nq] float32,
    -inf where a query sees nothing)."""
    if kernel is not None and implementation == "reference":  # the default: not given
        implementation = None
    implementation = resolve_prefix_implementation(implementation, kernel, name="implementation")
    _b, t, _nq, h = q.shape
    s = k.shape[2]
    if causal and t != s:
        raise ValueError(f"a causal prefix block needs as many queries as keys, got T={t} and S={s}")
    scale = h**-0.5 if scale is None else scale
    q_len = q_len.astype(jnp.int32)
    kv_len = kv_len.astype(jnp.int32)
    if implementation == "cudnn":
        out, lse = _cudnn(q, k, v, q_len, kv_len, causal, scale)
    elif implementation == "pallas":
        out, lse = _pallas(q, k, v, kv_len, causal, scale)
    else:
        tq = jnp.arange(t, dtype=jnp.int32)[None, :]
        ts = jnp.arange(s, dtype=jnp.int32)[None, None, :]
        q_pos = jnp.where(tq < q_len[:, None], tq if causal else jnp.int32(s), -1)
        k_pos = jnp.broadcast_to(jnp.where(ts < kv_len[:, None, None], ts, -1), k.shape[:3])
        res = attention.attend(q, k, v, q_pos, k_pos, scale=scale, implementation="reference")
        out, lse = res.out, res.lse
    valid = (jnp.arange(t)[None, :] < q_len[:, None]) & (kv_len[:, None] > 0)
    out = jnp.where(valid[:, :, None, None], out, 0).astype(q.dtype)
    lse = jnp.where(valid[:, :, None], lse.astype(jnp.float32), -jnp.inf)
    return out, lse


def _cudnn(q, k, v, q_len, kv_len, causal, scale):
    """cuDNN flash attention (GPU, bf16/fp16, head_dim <= 256, multiple of 8), heads-major
    layout, log-sum-exp kept in float32 through JAX's cuDNN module."""
    qt = jnp.swapaxes(q, 1, 2)  # [B, Nq, T, H]
    try:
        from jax._src.cudnn import fused_attention_stablehlo as fa

        mask = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
        out, lse = fa.dot_product_attention(
            qt,
            k,
            v,
            q_seqlen=q_len,
            kv_seqlen=kv_len,
            scale=scale,
            mask_type=mask,
            qkv_layout="BNTH",
            return_residual=True,
        )
        return jnp.swapaxes(out, 1, 2), jnp.swapaxes(lse.astype(jnp.float32), 1, 2)
    except (ImportError, AttributeError, TypeError):  # public API: same kernel, bf16 log-sum-exp
        out, lse = jax.nn.dot_product_attention(
            q,
            jnp.swapaxes(k, 1, 2),
            jnp.swapaxes(v, 1, 2),
            scale=scale,
            is_causal=causal,
            query_seq_lengths=q_len,
            key_value_seq_lengths=kv_len,
            implementation="cudnn",
            return_residual=True,
        )
        return out, lse.astype(jnp.float32)


def _pallas(q, k, v, kv_len, causal, scale):
    """kvjax's block-sparse flash kernel (pallas_kernels; Mosaic GPU / Triton / Mosaic TPU).
    T and S must be multiples of its query / key blocks (128 on Hopper)."""
    return block_sparse_attention(
        q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask=MaskSpec(causal=causal), kv_lengths=kv_len, scale=scale
    )


def attention_flops(batch: int, q_len: int, kv_len: int, num_heads: int, head_dim: int, causal: bool) -> float:
    """Matmul FLOPs of one attention call (QK^T and PV), halved for a causal square block."""
    f = 4.0 * batch * q_len * kv_len * num_heads * head_dim
    return f / 2 if causal else f


__all__ = ["PREFIX_IMPLEMENTATIONS", "attention_flops", "prefix_attention", "resolve_prefix_implementation"]
