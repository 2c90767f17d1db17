"""Kernel-backed attention: `kvjax.attention.attend(implementation="pallas")`.

`attend` passes a cache in kvjax's layout (q [B,T,Nq,H], k/v [B,N,S,H], q_pos [B,T], k_pos
[B,N,S]). The prefill kernel wants a prefix-valid cache: this module checks, on device and per
call, whether the positions have that shape and otherwise runs the jnp reference, so a policy
that evicts, merges or reorders slots gets exactly the reference result (`lax.cond`, both
traced). The decode kernel reads the positions itself and needs no check:

  * prefill / chunks (T > 1): slots hold positions 0..len-1 in order (same len for every KV
    head), queries sit at positions 0..T-1 (or -1 = padding) -> block-sparse flash attention
    (causal, plus the sliding window) over the transposed, padded cache;
  * decode (T == 1): the sparse-decode kernel with every block of the cache selected (a dense
    split-K decode) and the slot positions masked inside it, so any cache layout takes it
    (the capacity must be a multiple of 16 slots; `Dense` rounds it up to 64).
With `want_mass` the kernels' log-sum-exps give each slot's softmax mass in one more q.k pass
(`key_mass_from_lse`). Shapes or dtypes no kernel takes run the reference.

The kernels' lowering follows `kvjax.pallas_kernels._compat.backend_kind()`: Mosaic GPU
(Hopper) or Triton on GPUs, Mosaic TPU on TPUs (prefill, and decode with blocks of up to 512
slots), and on CPU the Triton kernels in interpret mode (slow; for tests) when "pallas" is asked
for explicitly.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .attention_reference import AttentionOutput, attention_reference, key_mass_from_lse
from .pallas_kernels import _compat
from .pallas_kernels.block_mask import MaskSpec
from .pallas_kernels.block_sparse_attention import SUPPORTED_DTYPES, BlockSizes, block_sparse_attention
from .pallas_kernels.sparse_decode_attention import sparse_decode_attention


def _prefix_lengths(k_pos):
    """(slots hold 0..len-1 then -1, for every (row, head)), lengths [B, N]."""
    s = k_pos.shape[-1]
    lens = jnp.sum(k_pos >= 0, axis=-1, dtype=jnp.int32)
    ar = jnp.arange(s, dtype=k_pos.dtype)
    ok = jnp.all(k_pos == jnp.where(ar < lens[..., None], ar, -1))
    return ok, lens


def _prefill_backend(q, backend):
    """The block-sparse backend that can run these shapes, or None."""
    h = q.shape[-1]
    if not any(q.dtype == d for d in SUPPORTED_DTYPES):
        return None
    pow2 = h >= 16 and not h & (h - 1)
    if backend == "mosaic_gpu":
        if q.dtype != jnp.float32 and h % 64 == 0:
            return "mosaic_gpu"
        return "triton" if pow2 else None
    if backend == "triton":
        return "triton" if pow2 else None
    if backend == "mosaic_tpu":
        return "mosaic_tpu"
    return None


def _prefill(q, k, v, q_pos, k_pos, window, scale, backend, interpret, prefix_cache=False):
    _b, t, _nq, _h = q.shape
    s = k.shape[2]
    bs = BlockSizes.get_default(backend)
    mbq = bs.meta_block_q(backend)
    tp, sp = -(-t // mbq) * mbq, -(-s // bs.block_kv) * bs.block_kv
    ok, lens = _prefix_lengths(k_pos)
    ok &= jnp.all(lens == lens[:, :1])
    ok &= jnp.all((q_pos == jnp.arange(t, dtype=q_pos.dtype)[None]) | (q_pos < 0))

    def kernel():
        qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
        kt = jnp.pad(jnp.swapaxes(k, 1, 2), ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        vt = jnp.pad(jnp.swapaxes(v, 1, 2), ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        out, lse = block_sparse_attention(
            qp,
            kt,
            vt,
            mask=MaskSpec(causal=True, window=window),
            kv_lengths=lens[:, 0],
            scale=scale,
            backend=backend,
            interpret=interpret,
        )
        valid = (q_pos >= 0)[..., None]
        out = jnp.where(valid[..., None], out[:, :t], 0).astype(q.dtype)
        return out, jnp.where(valid, lse[:, :t], -jnp.inf)

    def reference():
        r = attention_reference(q, k, v, q_pos, k_pos, window=window, scale=scale)
        return r.out, r.lse.astype(jnp.float32)

    if prefix_cache:  # the caller promised the layout (attend's prefix_cache): no check, no fallback
        return kernel()
    return lax.cond(ok, kernel, reference)


def _decode(q, k, v, q_pos, k_pos, window, scale, interpret, block, backend=None):
    """Every slot block, masked by the slot positions inside the kernel: exact for any cache
    layout (prefix, evicted, merged), with no per-layer check or `lax.cond` (a conditional costs
    the GPU a device-to-host sync per layer per step)."""
    b, _, _, _ = q.shape
    n, s = k.shape[1], k.shape[2]
    nblk = s // block
    idx = jnp.broadcast_to(jnp.arange(nblk, dtype=jnp.int32), (b, n, nblk))
    lens = jnp.full((b, n), s, jnp.int32)
    return sparse_decode_attention(
        q,
        k,
        v,
        idx,
        lens,
        block_size=block,
        scale=scale,
        k_pos=k_pos,
        q_pos=q_pos,
        window=window,
        selection_is_clean=True,
        backend=backend,
        interpret=interpret,
    )


def pallas_attention(
    q, k, v, q_pos, k_pos, *, window=None, scale=None, want_mass=False, prefix_cache=False
) -> AttentionOutput:
    """`attend` through the Pallas kernels where the cache is prefix-valid (module docstring)."""
    backend = _compat.backend_kind()
    interpret = backend == "reference"  # no lowering for this device: the Triton kernels, interpreted
    if interpret:
        backend = "triton"
    t, h = q.shape[1], q.shape[3]
    s = k.shape[2]
    out = None
    if t > 1 and (pb := _prefill_backend(q, backend)) is not None:
        out, lse = _prefill(q, k, v, q_pos, k_pos, window, scale, pb, interpret, prefix_cache)
    elif t == 1 and q.dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        if backend in ("triton", "mosaic_gpu") and h >= 16 and not h & (h - 1):
            block = next((bl for bl in (64, 32, 16) if s % bl == 0), None)
            if block is not None:
                out, lse = _decode(q, k, v, q_pos, k_pos, window, scale, interpret, block)
        elif backend == "mosaic_tpu":  # one grid step per block: larger blocks, fewer steps
            block = next((bl for bl in (512, 256, 128, 64, 32, 16, 8) if s % bl == 0), None)
            if block is not None:
                out, lse = _decode(q, k, v, q_pos, k_pos, window, scale, interpret, block, backend="mosaic_tpu")
    if out is not None:
        # H2O-style key mass: one more q.k pass in bounded query chunks against the kernel's
        # log-sum-exps, instead of the reference's attention-sized score tiles.
        mass = key_mass_from_lse(q, k, q_pos, k_pos, lse, window=window, scale=scale) if want_mass else None
        return AttentionOutput(out, lse, mass)
    return attention_reference(q, k, v, q_pos, k_pos, window=window, scale=scale, want_mass=want_mass)


def kernel_backend() -> str:
    """Which kernel lowering "pallas" uses on the default device (`_compat.backend_kind`)."""
    return _compat.backend_kind()


__all__ = ["kernel_backend", "pallas_attention"]
