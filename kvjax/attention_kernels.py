"""Kernel-backed attention: `kvjax.attention.attend(implementation="pallas")`.

`attend` passes a cache in kvjax's layout (q [B,T,Nq,H], k/v [B,N,S,H], q_pos [B,T], k_pos
[B,N,S]). Which kernel runs:

  * decode (T == 1): the sparse-decode kernel with every block of the cache selected (a dense
    split-K decode) and the slot positions masked inside it, so any cache layout takes it with
    no check (the capacity must be a multiple of 16 slots; `Dense` rounds it up to 64).
  * a whole prompt into an empty cache (`prefix_cache=True`, the caller's promise): block-sparse
    flash attention (causal, plus the sliding window) over the transposed, padded cache.
  * a few queries (T > 1, T x G <= `ROWS_PER_TILE` rows; speculative verification, a short
    chunk): one tile of the decode kernel, any layout, no check.
  * a longer prompt chunk at an offset: an on-device check (one `lax.switch`, every branch
    traced) of whether the cache is prefix-valid (slots hold 0..len-1 in order, the same len for
    every KV head) and the queries sit at off..off+T-1 (or -1 = padding) for one offset `off`.
    If so, at off = 0 the prefill kernel as above; at off > 0 two block-sparse calls whose
    log-sum-exps merge (`merge_partials`): the chunk's queries against the past slots 0..off-1
    with no mask but the length (key blocks past it are skipped), and against the chunk's own T
    slots, causal. Otherwise (an evicted, merged or re-ordered past, or a sliding window at a
    non-zero offset), the position-masked decode kernel over tiles of queries (`_any_layout`:
    `ROWS_PER_TILE` rows = queries x G heads per tile, a `lax.map` over the tiles). No branch
    holds a [T, S] score array, so a chunked prefill of a long prompt needs no memory
    proportional to chunk x context.
With `want_mass` the kernels' log-sum-exps give each slot's softmax mass in one more q.k pass
(`key_mass_from_lse`). Shapes or dtypes no kernel takes run the jnp reference (bounded off the
CPU: `attention_reference`'s key blocks); every such choice is counted at trace time with its
reason (`fallbacks()`, and the "kvjax.attention" logger: a debug record each time, a warning the
first time a reason is seen on a GPU or TPU).

The kernels' lowering follows `kvjax.pallas_kernels._compat.backend_kind()`: Mosaic GPU
(Hopper) or Triton on GPUs, Mosaic TPU on TPUs (prefill, and decode with blocks of up to 512
slots), and on CPU the Triton kernels in interpret mode (slow; for tests) when "pallas" is asked
for explicitly.
"""

from __future__ import annotations

import collections
import logging

import jax
import jax.numpy as jnp
from jax import lax

from .attention_reference import AttentionOutput, attention_reference, key_mass_from_lse, merge_partials
from .pallas_kernels import _compat
from .pallas_kernels.block_mask import MaskSpec
from .pallas_kernels.block_sparse_attention import SUPPORTED_DTYPES, BlockSizes, block_sparse_attention
from .pallas_kernels.sparse_decode_attention import sparse_decode_attention

logger = logging.getLogger("kvjax.attention")

#: Query rows (queries x the G query heads of a KV head) one decode-kernel program holds when
#: several queries run through it (`_any_layout`).
ROWS_PER_TILE = 64

_FALLBACKS: collections.Counter[str] = collections.Counter()
_WARNED: set[str] = set()


def record_fallback(reason: str) -> None:
    """Count one attention call that takes the jnp reference instead of a kernel, with why.

    Called at trace time by the dispatchers (a compiled program that runs again is not counted
    again). Logs a debug record on the "kvjax.attention" logger, and a warning the first time a
    reason is seen while the default backend is a GPU or TPU (where the reference is the slow
    path)."""
    _FALLBACKS[reason] += 1
    logger.debug("attention takes the jnp reference: %s", reason)
    if reason not in _WARNED and jax.default_backend() in ("gpu", "tpu"):
        _WARNED.add(reason)
        logger.warning("attention takes the jnp reference (counted in kvjax.attention.fallbacks()): %s", reason)


def fallbacks() -> dict[str, int]:
    """{reason: traced calls} of the attention calls that took the jnp reference instead of a
    kernel since the process started (or `reset_fallbacks`). Empty when every traced call with
    implementation="pallas" ran a kernel."""
    return dict(_FALLBACKS)


def reset_fallbacks() -> None:
    """Forget the counts `fallbacks` returns."""
    _FALLBACKS.clear()


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


def _decode_plan(q, s, backend):
    """((slot block, kernel backend), None) when the position-masked decode kernel takes these
    shapes, else (None, why not)."""
    h = q.shape[-1]
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return None, f"dtype={q.dtype} (the decode kernel takes float32, bfloat16, float16)"
    if backend in ("triton", "mosaic_gpu"):
        if h < 16 or h & (h - 1):
            return None, f"head_dim={h} is not a power of two >= 16 (Triton decode kernel)"
        block = next((bl for bl in (64, 32, 16) if s % bl == 0), None)
        if block is None:
            return None, f"cache capacity {s} is not a multiple of 16 slots (decode kernel blocks)"
        return (block, None), None
    if backend == "mosaic_tpu":  # one grid step per block: larger blocks, fewer steps
        block = next((bl for bl in (512, 256, 128, 64, 32, 16, 8) if s % bl == 0), None)
        if block is None:
            return None, f"cache capacity {s} is not a multiple of 8 slots (TPU decode kernel blocks)"
        return (block, "mosaic_tpu"), None
    return None, f"no decode kernel for backend={backend!r}"


def _pad_to(x, axis, size, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value) if size > x.shape[axis] else x


def _mask_padding(out, lse, q_pos, q_dtype):
    t = q_pos.shape[1]
    valid = (q_pos >= 0)[..., None]
    return jnp.where(valid[..., None], out[:, :t], 0).astype(q_dtype), jnp.where(valid, lse[:, :t], -jnp.inf)


def _prefill(q, k, v, q_pos, lens, window, scale, backend, interpret):
    """Block-sparse kernel for queries at 0..T-1 over a prefix-valid cache of lengths [B]."""
    t, s = q.shape[1], k.shape[2]
    bs = BlockSizes.get_default(backend)
    mbq = bs.meta_block_q(backend)
    tp, sp = -(-t // mbq) * mbq, -(-s // bs.block_kv) * bs.block_kv
    out, lse = block_sparse_attention(
        _pad_to(q, 1, tp),
        _pad_to(jnp.swapaxes(k, 1, 2), 1, sp),
        _pad_to(jnp.swapaxes(v, 1, 2), 1, sp),
        mask=MaskSpec(causal=True, window=window),
        kv_lengths=lens,
        scale=scale,
        backend=backend,
        interpret=interpret,
    )
    return _mask_padding(out, lse, q_pos, q.dtype)


def _chunk_layout(q_pos, k_pos, s):
    """(ok, off, lens [B]): whether the queries sit at off..off+T-1 (or -1) for one offset `off`
    and every (row, head) holds slots 0..len-1 in order with one len per row (and off + T <= S)."""
    t = q_pos.shape[1]
    off = jnp.maximum(jnp.max(q_pos[:, 0]), 0)
    ok, lens = _prefix_lengths(k_pos)
    ok &= jnp.all(lens == lens[:, :1])
    ok &= jnp.all((q_pos == off + jnp.arange(t, dtype=q_pos.dtype)[None]) | (q_pos < 0))
    ok &= off + t <= s
    return ok, off.astype(jnp.int32), lens[:, 0]


def _chunk(q, k, v, q_pos, off, lens, scale, backend, interpret):
    """Block-sparse kernel for a chunk of queries at off..off+T-1 (off traced) over a
    prefix-valid cache of lengths [B] that holds the chunk in slots off..off+T-1: the past slots
    0..off-1 (no mask but the length; key blocks past it are skipped) and the chunk's own slots
    (causal), merged through their log-sum-exps. The kernel's causal mask takes a static query
    offset only, hence the split."""
    t, s = q.shape[1], k.shape[2]
    bs = BlockSizes.get_default(backend)
    mbq, bk = bs.meta_block_q(backend), bs.block_kv
    tp, tk, sp = -(-t // mbq) * mbq, -(-t // bk) * bk, -(-s // bk) * bk
    qp = _pad_to(q, 1, tp)
    kw = dict(scale=scale, backend=backend, interpret=interpret)
    out_p, lse_p = block_sparse_attention(
        qp,
        _pad_to(jnp.swapaxes(k, 1, 2), 1, sp),
        _pad_to(jnp.swapaxes(v, 1, 2), 1, sp),
        mask=MaskSpec(),
        kv_lengths=jnp.minimum(lens, off),
        **kw,
    )
    kc, vc = (_pad_to(jnp.swapaxes(lax.dynamic_slice_in_dim(x, off, t, axis=2), 1, 2), 1, tk) for x in (k, v))
    out_c, lse_c = block_sparse_attention(
        qp, kc, vc, mask=MaskSpec(causal=True), kv_lengths=jnp.clip(lens - off, 0, t), **kw
    )
    out, lse = merge_partials([out_p[:, :t], out_c[:, :t]], [lse_p[:, :t], lse_c[:, :t]])
    return _mask_padding(out, lse, q_pos, q.dtype)


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


def _any_layout(q, k, v, q_pos, k_pos, window, scale, interpret, block, backend=None, rows=ROWS_PER_TILE):
    """T queries over any cache layout through the position-masked decode kernel, in tiles of
    max(1, rows // G) queries (one `lax.map` step each), so a program holds one tile's
    [rows, H] queries and no score array larger than [rows, block]."""
    b, t, nq, h = q.shape
    g = nq // k.shape[1]
    tq = max(1, rows // g)
    if t <= tq:
        return _decode(q, k, v, q_pos, k_pos, window, scale, interpret, block, backend)
    nt = -(-t // tq)
    qs = _pad_to(q, 1, nt * tq).reshape(b, nt, tq, nq, h).swapaxes(0, 1)
    ps = _pad_to(q_pos, 1, nt * tq, value=-1).reshape(b, nt, tq).swapaxes(0, 1)
    out, lse = lax.map(lambda a: _decode(a[0], k, v, a[1], k_pos, window, scale, interpret, block, backend), (qs, ps))
    out = out.swapaxes(0, 1).reshape(b, nt * tq, nq, h)[:, :t]
    return out, lse.swapaxes(0, 1).reshape(b, nt * tq, nq)[:, :t]


def pallas_attention(
    q, k, v, q_pos, k_pos, *, window=None, scale=None, want_mass=False, prefix_cache=False
) -> AttentionOutput:
    """`attend` through the Pallas kernels (module docstring): the decode kernel for one query,
    the prefill kernel for a promised prefix, and for a chunk the chunk kernels or the tiled
    decode kernel, chosen on device by the cache layout."""
    backend = _compat.backend_kind()
    interpret = backend == "reference"  # no lowering for this device: the Triton kernels, interpreted
    if interpret:
        backend = "triton"
    t, h = q.shape[1], q.shape[3]
    s = k.shape[2]
    plan, why = _decode_plan(q, s, backend)
    res = reason = None
    if t == 1:
        if plan is not None:
            res = _decode(q, k, v, q_pos, k_pos, window, scale, interpret, *plan)
        else:
            reason = f"decode: {why}"
    else:
        pb = _prefill_backend(q, backend)

        def any_layout():
            if plan is not None:
                return _any_layout(q, k, v, q_pos, k_pos, window, scale, interpret, *plan)
            r = attention_reference(q, k, v, q_pos, k_pos, window=window, scale=scale)
            return r.out, r.lse.astype(jnp.float32)

        if pb is not None and prefix_cache:  # the caller promised the layout: no check, no fallback
            res = _prefill(q, k, v, q_pos, _prefix_lengths(k_pos)[1][:, 0], window, scale, pb, interpret)
        elif plan is not None and t * (q.shape[2] // k.shape[1]) <= ROWS_PER_TILE:
            # a few queries (speculative verification, a short chunk): one decode-kernel tile reads
            # the cache once, in place, for any layout, with no conditional
            res = _decode(q, k, v, q_pos, k_pos, window, scale, interpret, *plan)
        elif pb is not None:  # one conditional: offset 0 / a later chunk (no window) / any layout
            ok, off, lens = _chunk_layout(q_pos, k_pos, s)
            branches = [
                lambda: _prefill(q, k, v, q_pos, lens, window, scale, pb, interpret),
                any_layout,
            ]
            which = jnp.where(ok & (off == 0), 0, 1)
            if window is None:  # the kernel's window would need the offset statically
                branches.append(lambda: _chunk(q, k, v, q_pos, off, lens, scale, pb, interpret))
                which = jnp.where(ok & (off > 0), 2, which)
            res = lax.switch(which, branches)
        elif plan is not None:
            res = any_layout()
        else:
            reason = f"prefill: dtype={q.dtype} head_dim={h} (no block-sparse kernel on {backend}) and {why}"
        if pb is not None and plan is None:
            record_fallback(f"prefill over a non-prefix cache (taken when the on-device layout check fails): {why}")
    if res is not None:
        out, lse = res
        # H2O-style key mass: one more q.k pass in bounded query chunks against the kernel's
        # log-sum-exps, instead of the reference's attention-sized score tiles.
        mass = key_mass_from_lse(q, k, q_pos, k_pos, lse, window=window, scale=scale) if want_mass else None
        return AttentionOutput(out, lse, mass)
    record_fallback(reason)
    return attention_reference(q, k, v, q_pos, k_pos, window=window, scale=scale, want_mass=want_mass)


def kernel_backend() -> str:
    """Which kernel lowering "pallas" uses on the default device (`_compat.backend_kind`)."""
    return _compat.backend_kind()


__all__ = [
    "ROWS_PER_TILE",
    "fallbacks",
    "kernel_backend",
    "pallas_attention",
    "record_fallback",
    "reset_fallbacks",
]
