"""Decode attention over a KIVI-quantized KV cache (Liu et al. 2024, "KIVI: A Tuning-Free
Asymmetric 2bit Quantization for KV Cache", https://arxiv.org/abs/2402.02750).

One or a few query tokens (T; speculative verification) attend to
  * a packed 2/4/8-bit cache (layout shared with the quantization policy):
      k_codes uint32 [B, N, S/pw, H]   keys packed along tokens (pw = 32 // bits codes a word)
      k_scale, k_zero [B, N, S/Gk, H]  per channel, per group of Gk tokens
      v_codes uint32 [B, N, S, H/pw]   values packed along channels
      v_scale, v_zero [B, N, S, H/Gv]  per token, per group of Gv channels
      dequantized = code * scale + zero; `lengths` [B] or [B, N] valid tokens (a prefix)
  * plus a full-precision residual window k_res/v_res [B, N, R, H] with `res_lengths` valid
    slots; query t of T sees residual slots r < res_len - (T - 1 - t) (the new tokens sit at
    the end of the window, causally), and every valid quantized token.
GQA: q [B, T, Nq, H] with Nq = N * Gq; each program handles the T * Gq query rows of one KV
head. Split-K: the quantized tokens are cut into `num_splits` chunks (plus one program for the
residual) whose partial results are merged through their LSEs. Codes are unpacked and
dequantized in registers; the cache is read once. Returns (out [B,T,Nq,H], lse [B,T,Nq] f32).

Backends: the Triton lowering on every CUDA GPU ("mosaic_gpu" also runs it on this layout),
interpret mode on CPU, "mosaic_tpu" (grid over blocks of quantized tokens plus a residual step,
one online softmax in VMEM, in `quantized_decode_attention_tpu.py`; of `block_sizes` only
block_s and dequant_f32 apply, None picks the largest block that fits; with `interpret=True` it
runs in the TPU interpreter), and "xla" = the jnp reference. Measured in BENCHMARKS.md
("Kernels"): instruction-bound on the dequantization (0.6-0.9x cuDNN at 128k). The Hopper kernel,
`quantized_decode_attention_mgpu.py` (2.0-2.2x cuDNN), reads the same codes in a fragment
layout of its own (`to_fragment_layout`); KIVI caches on Hopper store that layout directly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import _compat, packing
from ._compat import pl
from ._decode_common import (
    finish,
    group_rows,
    init_carry,
    masked_softmax,
    merge_splits,
    online_update,
    per_head,
    ungroup_rows,
)

KERNEL_BITS = (2, 4, 8)
FLOAT_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeBlockSizes:
    """block_s: tokens per inner step; num_splits: split-K chunks (None = about 16 programs per
    SM). Defaults: the fastest KIVI-2 variant of `benchmarks/kernels_bench.py --sweep` (H100 and
    H200, 2026-11-26); the other unpack / convert / dtype choices were measured slower."""

    block_s: int = 64
    num_splits: int | None = None
    num_warps: int = 2
    num_stages: int = 3
    unpack: str = "rows"  # "rows" (2-D tiles, scales expanded) or "grouped" (4-D, scales broadcast per group)
    convert: str = "magic"  # code -> float: "magic" (2^23 + c, subtract) or "mantissa" (1 + c/2^b via a rotate)
    dequant_f32: bool = False  # keep dequantized K/V in float32 (tf32 dots on GPU) instead of q's dtype

    @classmethod
    def get_default(cls, backend: str = "triton") -> DecodeBlockSizes:
        return cls()


def _is_float(x) -> bool:
    return any(x.dtype == d for d in FLOAT_DTYPES)


def _infer(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res):
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
        if not _is_float(x):
            raise ValueError(f"{name} dtype={x.dtype} is not supported; expected float32, bfloat16 or float16")
    if (k_res is None) != (v_res is None):
        raise ValueError("pass both k_res and v_res, or neither")
    if k_res is not None:
        if k_res.shape != v_res.shape or k_res.ndim != 4 or k_res.shape[:2] != (b, n) or k_res.shape[3] != h:
            raise ValueError(f"k_res{k_res.shape}/v_res{v_res.shape} must be [B, N, R, H] with B={b}, N={n}, H={h}")
        if not (_is_float(k_res) and _is_float(v_res)):
            raise ValueError(f"residual dtype={k_res.dtype} is not supported; expected a float dtype")
    return b, t, nq, h, n, s, s // k_scale.shape[2], h // v_scale.shape[3]


# ----------------------------------------------------------------------------- reference


def dequantize_keys(k_codes, k_scale, k_zero, bits):
    """[B,N,S/pw,H] codes -> float32 keys [B,N,S,H] (scales repeat over groups of tokens)."""
    codes = packing.unpack(k_codes, bits, axis=2).astype(jnp.float32)
    gk = codes.shape[2] // k_scale.shape[2]
    return codes * jnp.repeat(k_scale.astype(jnp.float32), gk, axis=2) + jnp.repeat(
        k_zero.astype(jnp.float32), gk, axis=2
    )


def dequantize_values(v_codes, v_scale, v_zero, bits):
    """[B,N,S,H/pw] codes -> float32 values [B,N,S,H] (scales repeat over groups of channels)."""
    codes = packing.unpack(v_codes, bits, axis=3).astype(jnp.float32)
    gv = codes.shape[3] // v_scale.shape[3]
    return codes * jnp.repeat(v_scale.astype(jnp.float32), gv, axis=3) + jnp.repeat(
        v_zero.astype(jnp.float32), gv, axis=3
    )


def quantized_decode_attention_reference(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    lengths,
    *,
    bits,
    k_res=None,
    v_res=None,
    res_lengths=None,
    scale=None,
):
    """Dequantize everything and attend in float32 (same semantics as the kernel)."""
    b, t, nq, h, n, s, _, _ = _infer(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res)
    g = nq // n
    scale = h**-0.5 if scale is None else scale
    lengths = per_head(lengths, b, n, "lengths")
    k = dequantize_keys(k_codes, k_scale, k_zero, bits)
    v = dequantize_values(v_codes, v_scale, v_zero, bits)
    vis = jnp.broadcast_to((jnp.arange(s)[None, None, :] < lengths[..., None])[:, :, None, :], (b, n, t, s))
    if k_res is not None:
        r = k_res.shape[2]
        res_lengths = per_head(res_lengths, b, n, "res_lengths")
        k = jnp.concatenate([k, k_res.astype(jnp.float32)], axis=2)
        v = jnp.concatenate([v, v_res.astype(jnp.float32)], axis=2)
        limit = res_lengths[:, :, None] - (t - 1 - jnp.arange(t))[None, None, :]  # [B,N,T]
        vis_r = jnp.arange(r)[None, None, None, :] < limit[..., None]
        vis = jnp.concatenate([vis, vis_r], axis=3)
    qg = q.astype(jnp.float32).reshape(b, t, n, g, h)
    logits = jnp.einsum("btngh,bnsh->bngts", qg, k, precision="highest") * scale
    logits = jnp.where(vis[:, :, None], logits, -jnp.inf)
    p, lse = masked_softmax(logits)
    out = jnp.einsum("bngts,bnsh->btngh", p, v, precision="highest")
    return out.reshape(b, t, nq, h).astype(q.dtype), jnp.transpose(lse, (0, 3, 1, 2)).reshape(b, t, nq)


# ----------------------------------------------------------------------------- kernel


def _u32_to_f32(codes):
    """Exact uint32 (< 2**23) -> float32 with two integer/float ops (no slow int->float cvt)."""
    return lax.bitcast_convert_type(codes | jnp.uint32(0x4B000000), jnp.float32) - 8388608.0


def _unit_codes(words, rot, bits):
    """float32 1 + code / 2**bits for the code that `rot` rotates to the top of the mantissa:
    a rotate and one and/or (the float is exact; dequantize as f * (2^b s) + (z - 2^b s))."""
    r = (words << rot) | (words >> ((jnp.uint32(32) - rot) & jnp.uint32(31)))
    field = jnp.uint32(((1 << bits) - 1) << (23 - bits))
    return lax.bitcast_convert_type((r & field) | jnp.uint32(0x3F800000), jnp.float32)


def _expand_rows(x, rep):
    """[r, c] -> [r * rep, c] (each row repeated)."""
    if rep == 1:
        return x
    r, c = x.shape
    return jnp.broadcast_to(x[:, None, :], (r, rep, c)).reshape(r * rep, c)


def _expand_cols(x, rep):
    """[r, c] -> [r, c * rep] (each column repeated)."""
    if rep == 1:
        return x
    r, c = x.shape
    return jnp.broadcast_to(x[:, :, None], (r, c, rep)).reshape(r, c * rep)


def _kernel(
    len_ref,
    rlen_ref,
    q_ref,
    kc_ref,
    ks_ref,
    kz_ref,
    vc_ref,
    vs_ref,
    vz_ref,
    kr_ref,
    vr_ref,
    o_ref,
    lse_ref,
    *,
    bits,
    scale,
    bs,
    chunk,
    gk,
    gv,
    gq,
    t,
    num_splits,
    has_res,
    compute_dtype,
    unpack,
    convert,
):
    bi, ni, si = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pw = 32 // bits
    q = q_ref[...].astype(compute_dtype)  # [rows, H]
    rows, h = q.shape
    init = init_carry(rows, h)
    mask_code = jnp.uint32((1 << bits) - 1)

    @pl.when(si < num_splits)
    def _quantized():
        length = len_ref[bi, ni]
        start = si * chunk
        nblocks = jnp.clip(pl.cdiv(length - start, bs), 0, chunk // bs)
        k_shifts = (lax.broadcasted_iota(jnp.int32, (1, pw, 1), 1) * bits).astype(jnp.uint32)
        v_shifts = (lax.broadcasted_iota(jnp.int32, (1, 1, pw), 2) * bits).astype(jnp.uint32)
        k4_shifts = (lax.broadcasted_iota(jnp.int32, (1, 1, pw, 1), 2) * bits).astype(jnp.uint32)
        v4_shifts = (lax.broadcasted_iota(jnp.int32, (1, 1, 1, pw), 3) * bits).astype(jnp.uint32)
        k4_rot = (jnp.uint32(23 - bits + 32) - k4_shifts) & jnp.uint32(31)  # brings code j to mantissa bit 23-b
        v4_rot = (jnp.uint32(23 - bits + 32) - v4_shifts) & jnp.uint32(31)

        def body(j, carry):
            s0 = start + j * bs
            kw = kc_ref[pl.ds(pl.multiple_of(s0 // pw, bs // pw), bs // pw), :]  # [bs/pw, H]
            ng = max(bs // gk, 1)
            ks = ks_ref[pl.ds(s0 // gk, ng), :].astype(jnp.float32)  # [groups in block, H]
            kz = kz_ref[pl.ds(s0 // gk, ng), :].astype(jnp.float32)
            if unpack == "grouped":  # [groups, words/group, slots, H]; scales broadcast, one final reshape
                wg = min(bs, gk) // pw
                k4 = kw.reshape(ng, wg, 1, h)
                ks4, kz4 = ks.reshape(ng, 1, 1, h), kz.reshape(ng, 1, 1, h)
                if convert == "mantissa":
                    a = ks4 * float(1 << bits)
                    k = _unit_codes(k4, k4_rot, bits) * a + (kz4 - a)
                else:
                    k = _u32_to_f32((k4 >> k4_shifts) & mask_code) * ks4 + kz4
                k = k.astype(compute_dtype)
                sc = (
                    lax.dot_general(q, k.reshape(bs, h), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
                    * scale
                )
            else:
                kcodes = ((kw[:, None, :] >> k_shifts) & mask_code).reshape(bs, h)
                if bs >= gk:
                    ks, kz = _expand_rows(ks, gk), _expand_rows(kz, gk)
                k = (_u32_to_f32(kcodes) * ks + kz).astype(compute_dtype)
                sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            kpos = s0 + lax.broadcasted_iota(jnp.int32, (rows, bs), 1)
            sc = jnp.where(kpos < length, sc, -jnp.inf)
            vw = vc_ref[pl.ds(s0, bs), :]  # [bs, H/pw]
            vs = vs_ref[pl.ds(s0, bs), :].astype(jnp.float32)  # [bs, H/gv]
            vz = vz_ref[pl.ds(s0, bs), :].astype(jnp.float32)
            if unpack == "grouped":  # [bs, groups, words/group, slots]
                v4 = vw.reshape(bs, h // gv, gv // pw, 1)
                vs4, vz4 = vs.reshape(bs, h // gv, 1, 1), vz.reshape(bs, h // gv, 1, 1)
                if convert == "mantissa":
                    a = vs4 * float(1 << bits)
                    v = _unit_codes(v4, v4_rot, bits) * a + (vz4 - a)
                else:
                    v = _u32_to_f32((v4 >> v4_shifts) & mask_code) * vs4 + vz4
                v = v.astype(compute_dtype).reshape(bs, h)
            else:
                vcodes = ((vw[:, :, None] >> v_shifts) & mask_code).reshape(bs, h)
                v = (_u32_to_f32(vcodes) * _expand_cols(vs, gv) + _expand_cols(vz, gv)).astype(compute_dtype)
            return online_update(carry, sc, v)

        finish(lax.fori_loop(0, nblocks, body, init), o_ref, lse_ref)

    if has_res:

        @pl.when(si == num_splits)
        def _residual():
            k = kr_ref[...].astype(compute_dtype)
            v = vr_ref[...].astype(compute_dtype)
            r = k.shape[0]
            sc = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
            row_t = lax.broadcasted_iota(jnp.int32, (rows, r), 0) // gq  # query token of each row
            limit = rlen_ref[bi, ni] - (t - 1 - row_t)
            sc = jnp.where(lax.broadcasted_iota(jnp.int32, (rows, r), 1) < limit, sc, -jnp.inf)
            finish(online_update(init, sc, v), o_ref, lse_ref)


def _auto_splits(b, n, s, bs) -> int:
    want = max(1, (132 * 16) // max(b * n, 1))  # ~16 small programs per SM on a 132-SM part
    splits = 1
    while splits * 2 <= want and s % (splits * 2 * bs) == 0:
        splits *= 2
    return splits


@functools.partial(jax.jit, static_argnames=("bits", "scale", "bsz", "backend", "interpret"))
def _quantized_decode_jit(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    lengths,
    k_res,
    v_res,
    res_lengths,
    *,
    bits,
    scale,
    bsz: DecodeBlockSizes,
    backend,
    interpret,
):
    b, t, nq, h = q.shape
    n = k_codes.shape[1]
    pw = 32 // bits
    s = k_codes.shape[2] * pw
    gq = nq // n
    gk, gv = s // k_scale.shape[2], h // v_scale.shape[3]
    bs = bsz.block_s
    splits = bsz.num_splits or _auto_splits(b, n, s, bs)
    chunk = s // splits
    qr, rows = group_rows(q, n)
    rows_p = qr.shape[2]
    has_res = k_res is not None
    if not has_res:  # tiny dummies keep one kernel signature
        k_res = v_res = jnp.zeros((b, n, 16, h), q.dtype)
        res_lengths = jnp.zeros((b, n), jnp.int32)
    r = k_res.shape[2]
    num_prog = splits + (1 if has_res else 0)
    compute_dtype = jnp.float32 if (q.dtype == jnp.float32 or bsz.dequant_f32) else q.dtype
    kernel = functools.partial(
        _kernel,
        bits=bits,
        scale=scale,
        bs=bs,
        chunk=chunk,
        gk=gk,
        gv=gv,
        gq=gq,
        t=t,
        num_splits=splits,
        has_res=has_res,
        compute_dtype=compute_dtype,
        unpack=bsz.unpack,
        convert=bsz.convert,
    )
    per_bn = lambda *shape: pl.BlockSpec((None, None, *shape), lambda bi, ni, si: (bi, ni) + (0,) * len(shape))
    full = lambda a: pl.BlockSpec(a.shape, lambda *_: (0,) * a.ndim)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, n, num_prog),
        in_specs=[
            full(lengths),
            full(res_lengths),
            per_bn(rows_p, h),
            per_bn(s // pw, h),
            per_bn(s // gk, h),
            per_bn(s // gk, h),
            per_bn(s, h // pw),
            per_bn(s, h // gv),
            per_bn(s, h // gv),
            per_bn(r, h),
            per_bn(r, h),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows_p, h), lambda bi, ni, si: (bi, ni, si, 0, 0)),
            pl.BlockSpec((None, None, None, rows_p), lambda bi, ni, si: (bi, ni, si, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, n, num_prog, rows_p, h), jnp.float32),
            jax.ShapeDtypeStruct((b, n, num_prog, rows_p), jnp.float32),
        ],
        compiler_params=None if interpret else _compat.triton_params(bsz.num_warps, bsz.num_stages),
        interpret=interpret,
        name=f"kivi{bits}_decode_attention",
    )(lengths, res_lengths, qr, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_res, v_res)
    out, lse = ungroup_rows(*merge_splits(o, lse), t, rows)
    return out.astype(q.dtype), lse


def quantized_decode_attention(
    q,
    k_codes,
    k_scale,
    k_zero,
    v_codes,
    v_scale,
    v_zero,
    lengths,
    *,
    bits: int,
    k_res=None,
    v_res=None,
    res_lengths=None,
    scale: float | None = None,
    block_sizes: DecodeBlockSizes | None = None,
    backend: str | None = None,
    interpret: bool = False,
):
    """KIVI decode attention (see module docstring). lengths / res_lengths: [B] or [B, N].
    Returns (out [B, T, Nq, H] in q.dtype, lse [B, T, Nq] float32)."""
    b, _t, _nq, h, n, s, gk, gv = _infer(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, bits, k_res, v_res)
    if backend is None:
        backend = "triton" if interpret else _compat.backend_kind()
    _compat.check_backend(backend, ("triton", "mosaic_gpu", "mosaic_tpu", "xla"))
    if backend == "xla":
        return quantized_decode_attention_reference(
            q,
            k_codes,
            k_scale,
            k_zero,
            v_codes,
            v_scale,
            v_zero,
            lengths,
            bits=bits,
            k_res=k_res,
            v_res=v_res,
            res_lengths=res_lengths,
            scale=scale,
        )
    if backend == "mosaic_tpu":
        from .quantized_decode_attention_tpu import quantized_decode_attention_tpu

        return quantized_decode_attention_tpu(
            q,
            k_codes,
            k_scale,
            k_zero,
            v_codes,
            v_scale,
            v_zero,
            lengths,
            bits=bits,
            k_res=k_res,
            v_res=v_res,
            res_lengths=res_lengths,
            scale=scale,
            block_sizes=block_sizes,
            interpret=interpret,
        )
    bsz = block_sizes or DecodeBlockSizes.get_default(backend)
    bs, pw = bsz.block_s, 32 // bits
    if s % bs or bs % pw or (bs % gk and gk % bs):
        raise ValueError(
            f"S={s} must be a multiple of block_s={bs}, which must be a multiple of {pw} (bits={bits}) "
            f"and divide or be divided by the key group Gk={gk}"
        )
    if bsz.unpack not in ("grouped", "rows") or bsz.convert not in ("mantissa", "magic"):
        raise ValueError(
            f"unpack={bsz.unpack!r}, convert={bsz.convert!r}; expected unpack 'grouped' or 'rows' "
            "and convert 'mantissa' or 'magic'"
        )
    if bsz.unpack == "grouped" and (min(bs, gk) % pw or gv % pw):
        raise ValueError(
            f"unpack='grouped' needs groups Gk={gk} (or block_s={bs}) and Gv={gv} to be multiples of "
            f"{pw} codes per word (bits={bits}); use unpack='rows'"
        )
    splits = bsz.num_splits
    if splits is not None and s % (splits * bs):
        raise ValueError(f"S={s} must be a multiple of num_splits * block_s = {splits} * {bs}")
    for name, val in (("head_dim", h), ("block_s", bs), ("H/Gv", h // gv), ("H/pw", h // pw)):
        if val & (val - 1):
            raise ValueError(f"{name}={val} must be a power of two for the triton backend")
    if k_res is not None and (k_res.shape[2] < 16 or k_res.shape[2] & (k_res.shape[2] - 1)):
        raise ValueError(f"residual window R={k_res.shape[2]} must be a power of two >= 16")
    if k_res is not None and res_lengths is None:
        raise ValueError("res_lengths is required with a residual window")
    lengths = jnp.minimum(per_head(lengths, b, n, "lengths"), s)
    if res_lengths is not None:
        res_lengths = jnp.minimum(per_head(res_lengths, b, n, "res_lengths"), k_res.shape[2])
    scale = float(h**-0.5 if scale is None else scale)
    return _quantized_decode_jit(
        q,
        k_codes,
        k_scale,
        k_zero,
        v_codes,
        v_scale,
        v_zero,
        lengths,
        k_res,
        v_res,
        res_lengths,
        bits=bits,
        scale=scale,
        bsz=bsz,
        backend=backend,
        interpret=interpret,
    )


def compressed_bytes(b, n, s, h, bits, gk, gv, scale_bytes=2, r=0, res_bytes=2) -> int:
    """Bytes the kernel must read for one decode step (codes + scales/zeros + residual)."""
    codes = 2 * b * n * s * h * bits // 8
    scales = 2 * b * n * (s // gk) * h * scale_bytes + 2 * b * n * s * (h // gv) * scale_bytes
    return codes + scales + 2 * b * n * r * h * res_bytes
