"""Pieces shared by the decode kernels, so that each backend's module imports this one and
none imports another backend's: the input checks of the sparse and the quantized (KIVI) decode
kernels, the KIVI kernels' tuning knobs (`DecodeBlockSizes`), GQA row grouping, the
online-softmax step (in registers for the Triton kernels, in VMEM scratch refs for the Mosaic
TPU ones), and the LSE merge of split-K partial results."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

NEG_INIT = -1e30  # running-max start: finite, so fully masked blocks give p = 0, alpha = 1
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
KERNEL_BITS = (2, 4, 8)  # code widths the quantized decode kernels read


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeBlockSizes:
    """Tuning knobs of the KIVI decode kernels (static). block_s: tokens per inner step;
    num_splits: split-K chunks (None = about 16 programs per SM); num_warps, num_stages: Triton
    compiler parameters; dequant_f32: keep dequantized K/V in float32 (tf32 dots on GPU) instead
    of q's dtype. On mosaic_tpu only block_s (one grid step each) and dequant_f32 apply."""

    block_s: int = 64
    num_splits: int | None = None
    num_warps: int = 2
    num_stages: int = 3
    dequant_f32: bool = False

    @classmethod
    def get_default(cls, backend: str = "triton") -> DecodeBlockSizes:
        return cls()


def is_float(x) -> bool:
    return any(x.dtype == d for d in FLOAT_DTYPES)


def u32_to_f32(codes):
    """Exact uint32 (< 2**23) -> float32 with two integer/float ops (no slow int->float cvt)."""
    return lax.bitcast_convert_type(codes | jnp.uint32(0x4B000000), jnp.float32) - 8388608.0


def check_quantized_inputs(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res):
    """The KIVI decode kernels' inputs (layout in `quantized_decode_attention`) -> (b, t, nq, h,
    n, s, gk, gv); raises ValueError naming the value that does not fit."""
    if bits not in KERNEL_BITS:
        raise ValueError(f"bits={bits} is not supported by the quantized decode kernel; expected one of {KERNEL_BITS}")
    pw = 32 // bits
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Nq, H]; got shape {q.shape}")
    b, t, nq, h = q.shape
    for name, x in (("k_codes", k_codes), ("v_codes", v_codes)):
        if x.dtype != jnp.uint32 or x.ndim != 4:
            raise ValueError(f"{name} must be a 4-D uint32 array; got {x.dtype}{x.shape}")
    n = k_codes.shape[1]
    s = k_codes.shape[2] * pw
    if k_codes.shape != (b, n, s // pw, h):
        raise ValueError(f"k_codes{k_codes.shape} must be [B, N, S/{pw}, H] with B={b}, H={h} (from q{q.shape})")
    if nq % n:
        raise ValueError(f"query heads {nq=} must be a multiple of key/value heads {n=}")
    if v_codes.shape != (b, n, s, h // pw) or h % pw:
        raise ValueError(f"v_codes{v_codes.shape} must be [B, N, S, H/{pw}] = {(b, n, s, h // pw)} for bits={bits}")
    if k_scale.shape != k_zero.shape or k_scale.ndim != 4 or k_scale.shape[:2] != (b, n) or k_scale.shape[3] != h:
        raise ValueError(
            f"k_scale{k_scale.shape}/k_zero{k_zero.shape} must be [B, N, S/Gk, H] with B={b}, N={n}, H={h}"
        )
    if v_scale.shape != v_zero.shape or v_scale.ndim != 4 or v_scale.shape[:3] != (b, n, s):
        raise ValueError(f"v_scale{v_scale.shape}/v_zero{v_zero.shape} must be [B, N, S, H/Gv] with S={s}")
    if s % k_scale.shape[2] or h % v_scale.shape[3]:
        raise ValueError(
            f"groups must divide: S={s} by k groups {k_scale.shape[2]}, H={h} by v groups {v_scale.shape[3]}"
        )
    for name, x in (("q", q), ("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        if not is_float(x):
            raise ValueError(f"{name} dtype={x.dtype} is not supported; expected float32, bfloat16 or float16")
    if (k_res is None) != (v_res is None):
        raise ValueError("pass both k_res and v_res, or neither")
    if k_res is not None:
        if k_res.shape != v_res.shape or k_res.ndim != 4 or k_res.shape[:2] != (b, n) or k_res.shape[3] != h:
            raise ValueError(f"k_res{k_res.shape}/v_res{v_res.shape} must be [B, N, R, H] with B={b}, N={n}, H={h}")
        if not (is_float(k_res) and is_float(v_res)):
            raise ValueError(f"residual dtype={k_res.dtype} is not supported; expected a float dtype")
    return b, t, nq, h, n, s, s // k_scale.shape[2], h // v_scale.shape[3]


def check_sparse_inputs(q, k, v, block_indices, block_size):
    """The sparse decode kernels' inputs (layout in `sparse_decode_attention`) -> (b, t, nq, h,
    n, s); raises ValueError naming the value that does not fit."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"expected q [B,T,Nq,H], k/v [B,N,S,H]; got q{q.shape} k{k.shape} v{v.shape}")
    if k.shape != v.shape:
        raise ValueError(f"k{k.shape} and v{v.shape} must have the same shape")
    b, t, nq, h = q.shape
    _, n, s, hk = k.shape
    if k.shape[0] != b or hk != h:
        raise ValueError(f"q{q.shape} and k{k.shape} must agree on batch and head_dim")
    if nq % n:
        raise ValueError(f"query heads {nq=} must be a multiple of key/value heads {n=}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not is_float(x):
            raise ValueError(f"{name} dtype={x.dtype} is not supported; expected float32, bfloat16 or float16")
    if s % block_size:
        raise ValueError(f"S={s} must be a multiple of block_size={block_size}")
    if block_indices.ndim != 3 or block_indices.shape[:2] != (b, n):
        raise ValueError(f"block_indices shape {block_indices.shape} must be [B, N, K] with B={b}, N={n}")
    if not jnp.issubdtype(block_indices.dtype, jnp.integer):
        raise ValueError(f"block_indices dtype={block_indices.dtype} must be an integer type")
    return b, t, nq, h, n, s


def check_positions(k_pos, q_pos, b, t, n, s, window=None):
    """Optional slot positions k_pos [B, N, S] and query positions q_pos [B, T] (both or
    neither), and a local window that needs them."""
    if (k_pos is None) != (q_pos is None):
        raise ValueError("pass both k_pos [B, N, S] and q_pos [B, T], or neither")
    if k_pos is not None:
        if k_pos.shape != (b, n, s) or q_pos.shape != (b, t):
            raise ValueError(
                f"k_pos{k_pos.shape} must be [B, N, S] = {(b, n, s)} and q_pos{q_pos.shape} [B, T] = {(b, t)}"
            )
        for name, x in (("k_pos", k_pos), ("q_pos", q_pos)):
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise ValueError(f"{name} dtype={x.dtype} must be an integer type")
    if window is not None and (k_pos is None or window < 1):
        raise ValueError(f"window={window} needs k_pos/q_pos and must be >= 1")


def next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def group_rows(q, n: int):
    """q [B, T, N*Gq, H] -> rows [B, N, rows_p, H] (row = t * Gq + g, zero-padded to a power
    of two >= 16 so the tensor-core dot applies) and the unpadded row count."""
    b, t, nq, h = q.shape
    gq = nq // n
    rows = t * gq
    rows_p = max(16, next_pow2(rows))
    qr = q.reshape(b, t, n, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, n, rows, h)
    return jnp.pad(qr, ((0, 0), (0, 0), (0, rows_p - rows), (0, 0))), rows


def ungroup_rows(out, lse, t: int, rows: int):
    """Inverse of `group_rows` for out [B, N, rows_p, H] and lse [B, N, rows_p]."""
    b, n, _, h = out.shape
    gq = rows // t
    out = out[:, :, :rows].reshape(b, n, t, gq, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n * gq, h)
    lse = lse[:, :, :rows].reshape(b, n, t, gq).transpose(0, 2, 1, 3).reshape(b, t, n * gq)
    return out, lse


def masked_softmax(logits):
    """logits [..., S] (-inf = masked) -> (probabilities [..., S], natural-log LSE [...]); rows
    with every key masked give p = 0 and LSE -inf (the references' convention)."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    seen = jnp.isfinite(m)
    p = jnp.exp(logits - jnp.where(seen, m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(seen, l, 1.0), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)[..., 0]


def init_carry(rows: int, h: int):
    return (
        jnp.zeros((rows, h), jnp.float32),
        jnp.full((rows,), NEG_INIT, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )


def online_update(carry, s, v):
    """One flash step: carry (acc [rows,H], m [rows], l [rows]), scaled masked logits s
    [rows, n] (-inf = masked), values v [n, H]."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    l = l * alpha + jnp.sum(p, axis=1)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_new, l


def finish(carry, o_ref, lse_ref):
    """Write the normalized output and the natural-log LSE (-inf, out 0 for empty rows)."""
    acc, m, l = carry
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def merge_splits(o, lse, axis: int = 2):
    """Merge normalized partial outputs o [..., P, rows, H] and lse [..., P, rows] over P."""
    m = jnp.max(lse, axis=axis, keepdims=True)
    m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m_safe)
    total = jnp.sum(w, axis=axis)
    out = jnp.sum(o.astype(jnp.float32) * w[..., None], axis=axis) / jnp.where(total > 0, total, 1.0)[..., None]
    m_safe = jnp.squeeze(m_safe, axis)
    return out, jnp.where(total > 0, m_safe + jnp.log(jnp.where(total > 0, total, 1.0)), -jnp.inf)


def per_head(x, b: int, n: int, name: str):
    """Lengths given per row [B] or per (row, kv head) [B, N] -> int32 [B, N]."""
    x = checked_lengths(x, b, n, name)
    return jnp.broadcast_to(x[:, None], (b, n)) if x.ndim == 1 else x


def checked_lengths(x, b: int, n: int, name: str):
    """Lengths given per row [B] or per (row, kv head) [B, N] -> int32, same shape (kernels that
    index either shape themselves save the broadcast's launch)."""
    x = jnp.asarray(x, jnp.int32)
    if x.shape not in ((b,), (b, n)):
        raise ValueError(f"{name} must be [B]=({b},) or [B, N]=({b}, {n}); got shape {x.shape}")
    return x


def clean_selection(block_indices, counts, lengths, *, block_size: int, num_blocks: int):
    """block_indices [B, N, K], counts [B, N], lengths [B, N] -> (indices [B, N, K] int32: the
    kept blocks sorted and packed to the front, then the last kept one repeated (0 if none);
    kept counts [B, N] int32). Kept = listed (j < count), 0 <= idx, idx * block_size < length,
    first occurrence."""
    kk = block_indices.shape[-1]
    nvalid = (jnp.clip(lengths, 0, num_blocks * block_size) + block_size - 1) // block_size
    idx = block_indices.astype(jnp.int32)
    ok = (jnp.arange(kk) < counts[..., None]) & (idx >= 0) & (idx < nvalid[..., None])
    key = jnp.sort(jnp.where(ok, idx, num_blocks), axis=-1)  # num_blocks = "dropped", sorts last
    dup = jnp.concatenate([jnp.zeros_like(key[..., :1], bool), key[..., 1:] == key[..., :-1]], axis=-1)
    key = jnp.sort(jnp.where(dup, num_blocks, key), axis=-1)
    kept = jnp.sum(key < num_blocks, axis=-1, dtype=jnp.int32)
    last = jnp.take_along_axis(key, jnp.maximum(kept - 1, 0)[..., None], axis=-1)
    last = jnp.where(kept[..., None] > 0, last, 0)
    return jnp.where(jnp.arange(kk) < kept[..., None], key, last), kept


def scratch_init(m_scr, l_scr, acc_scr):
    """Start an online softmax held in scratch refs m, l [rows, 1] and acc [rows, H]."""
    m_scr[...] = jnp.full(m_scr.shape, NEG_INIT, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)


def scratch_update(m_scr, l_scr, acc_scr, s, v):
    """`online_update` on scratch refs: scaled masked logits s [rows, n], values v [n, H]."""
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m_prev - m_new)
    p = jnp.exp(s - m_new)
    l_scr[...] = l_scr[...] * alpha + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    acc_scr[...] = acc_scr[...] * alpha + pv
    m_scr[...] = m_new


def scratch_finish(m_scr, l_scr, acc_scr, o_ref, lse_ref):
    """`finish` from scratch refs (lse reshaped to lse_ref's block)."""
    l = l_scr[...]
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o_ref[...] = (acc_scr[...] / l_safe).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, m_scr[...] + jnp.log(l_safe), -jnp.inf).reshape(lse_ref.shape)
