"""KVQuant (Hooper et al., arXiv:2401.18079): pre-RoPE per-channel key quantization,
per-layer sensitivity-weighted non-uniform datatypes, per-vector dense-and-sparse
outliers and Q-Norm.

Keys: RoPE is undone (`rope_heads(..., inverse=True)`), each channel is normalized with
offline-calibrated per-channel thresholds (the outlier_frac/2 and 1-outlier_frac/2
quantiles of calibration keys), the largest-magnitude entries of each token vector are
kept exactly (sparse: channel index + float16 value), the rest is clipped to [-1, 1] and
mapped to the nearest centroid of the layer's key codebook; RoPE is re-applied after
dequantization at the stored position. Values: per token, the same dense-and-sparse
split, normalized online by the token's own range, the layer's value codebook.
Codebooks: 1-D k-means on calibration activations weighted by the Fisher information
(squared gradients of the next-token loss), per layer, with Q-Norm (centroids shifted and
scaled so the quantized distribution keeps the calibration mean and std).

Static shapes: every token vector keeps `max(1, round(outliers * head_dim))` sparse
entries (1 of 64 channels = 1.6% on SmolLM2), so the sparse part needs no dynamic CSR.
Every token is quantized on arrival (offline key scales make that possible), so
residual=0 by default; the first `sinks` tokens stay in full precision (the attention
sink: on SmolLM2 its key has 8-13 of 64 channels beyond the calibrated thresholds, so
with a 1-entry sparse budget its quantized key is off by more than 100% in deep layers). State per token and head: codes (bits * H / 8 bytes), position
(int32), 2 float16 value scales, 3 bytes per sparse entry for K and V.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..policies.base import PolicyError
from ..policies.registry import register
from . import affine, calibration
from .base import QuantPolicy, rope_heads

BITS = (2, 3, 4)


def n_outliers(frac: float, head_dim: int) -> int:
    """Sparse entries kept per token vector for an outlier fraction `frac`."""
    return 0 if frac <= 0 else max(1, round(frac * head_dim))


def nearest(x: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest centroid of a sorted 1-D codebook for every entry of x."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return jnp.searchsorted(mids, x.reshape(-1)).reshape(x.shape).astype(jnp.int32)


def split_outliers(x: jax.Array, mag: jax.Array, n: int):
    """Top-n entries of each vector by `mag` (last axis): (indices uint8, values float16,
    mask of those entries)."""
    _, idx = jax.lax.top_k(mag, n)
    mask = jnp.any(jnp.arange(x.shape[-1]) == idx[..., None], axis=-2)
    val = jnp.take_along_axis(x, idx, axis=-1)
    return idx.astype(jnp.uint8), val.astype(jnp.float16), mask


def scatter_outliers(x: jax.Array, idx: jax.Array, val: jax.Array) -> jax.Array:
    for j in range(idx.shape[-1]):
        x = jnp.where(
            jnp.arange(x.shape[-1]) == idx[..., j : j + 1].astype(jnp.int32), val[..., j : j + 1].astype(x.dtype), x
        )
    return x


@dataclasses.dataclass(frozen=True)
class KVQuantCodec:
    """Encode/decode with one layer's calibration (center/half [N, H], codebooks)."""

    bits: int
    n_out: int
    config: object
    center: object
    half: object
    k_cb: object
    v_cb: object

    def encode(self, k, v, pos, aux):
        h = k.shape[-1]
        center, half = jnp.asarray(self.center)[None, :, None], jnp.asarray(self.half)[None, :, None]
        k_cb, v_cb = jnp.asarray(self.k_cb), jnp.asarray(self.v_cb)
        kp = rope_heads(k, pos, self.config, inverse=True)
        xn = (kp - center) / half
        out = {"pos": pos.astype(jnp.int32)}
        if self.n_out:
            out["k_oidx"], out["k_oval"], _ = split_outliers(kp, jnp.abs(xn), self.n_out)
        out["k_codes"] = affine.pack(nearest(jnp.clip(xn, -1, 1), k_cb), self.bits, axis=3)
        vf = v.astype(jnp.float32)
        mask = jnp.zeros(vf.shape, bool)
        if self.n_out:
            out["v_oidx"], out["v_oval"], mask = split_outliers(vf, jnp.abs(vf), self.n_out)
        lo = jnp.min(jnp.where(mask, jnp.inf, vf), axis=-1, keepdims=True)
        hi = jnp.max(jnp.where(mask, -jnp.inf, vf), axis=-1, keepdims=True)
        mid = ((hi + lo) / 2).astype(jnp.float16)
        rng = jnp.maximum((hi - lo) / 2, 1e-6).astype(jnp.float16)
        vn = jnp.clip((vf - mid.astype(jnp.float32)) / rng.astype(jnp.float32), -1, 1)
        out["v_codes"] = affine.pack(nearest(vn, v_cb), self.bits, axis=3)
        out["v_mid"], out["v_half"] = mid[..., 0], rng[..., 0]
        del h
        return out

    def decode(self, d, aux):
        h = self.config.head_dim
        center, half = jnp.asarray(self.center)[None, :, None], jnp.asarray(self.half)[None, :, None]
        kn = jnp.asarray(self.k_cb)[affine.unpack(d["k_codes"], self.bits, 3, h)]
        kp = kn * half + center
        vn = jnp.asarray(self.v_cb)[affine.unpack(d["v_codes"], self.bits, 3, h)]
        v = vn * d["v_half"][..., None].astype(jnp.float32) + d["v_mid"][..., None].astype(jnp.float32)
        if self.n_out:
            kp = scatter_outliers(kp, d["k_oidx"], d["k_oval"])
            v = scatter_outliers(v, d["v_oidx"], d["v_oval"])
        return rope_heads(kp, d["pos"], self.config), v, d["pos"]


@register
@dataclasses.dataclass(frozen=True)
class KVQuant(QuantPolicy):
    """KVQuant at `bits` in {2, 3, 4}; `outliers`: fraction of each token vector kept
    sparse in float16; `qnorm`: use the Q-Norm centroids; `sinks`: first tokens kept in
    full precision (KVQuant's attention-sink-aware `first_few_fp16`); `calibration`: artifact
    directory ("" = the shipped one for the model)."""

    name = "kvquant"
    bits: int = 3
    outliers: float = 0.01
    qnorm: bool = True
    sinks: int = 1
    residual: int = 0
    calibration: str = ""
    needs_positions = True

    def __post_init__(self):
        if self.bits not in BITS:
            raise PolicyError(
                f"kvquant: bits={self.bits!r} is not supported; expected one of {BITS} (the calibrated codebooks)"
            )
        if not 0 <= self.outliers < 0.5:
            raise PolicyError(f"kvquant: outliers={self.outliers!r} must be a fraction in [0, 0.5)")
        if self.residual < 0 or self.sinks < 0:
            raise PolicyError(f"kvquant: residual={self.residual} and sinks={self.sinks} must be >= 0")

    def sink_count(self):
        return self.sinks

    def check_config(self, config):
        super().check_config(config)
        calibration.load(self.name, config, self.calibration)

    def codec(self, ctx):
        a = calibration.load(self.name, ctx.config, self.calibration)
        sfx = f"cb{self.bits}" + ("_qnorm" if self.qnorm else "")
        l = ctx.layer
        return KVQuantCodec(
            self.bits,
            n_outliers(self.outliers, ctx.config.head_dim),
            ctx.config,
            a["k_center"][l],
            a["k_half"][l],
            a[f"k_{sfx}"][l],
            a[f"v_{sfx}"][l],
        )


# ---- offline calibration ------------------------------------------------------------------
def weighted_kmeans_1d(x: np.ndarray, w: np.ndarray, k: int, iters: int = 60) -> np.ndarray:
    """Sorted centroids [k] minimising sum w * (x - c)^2 (Lloyd, weighted-quantile start)."""
    order = np.argsort(x)
    xs, ws = x[order], w[order] + 1e-12 * (w.max() + 1e-30)
    cw = np.cumsum(ws) / ws.sum()
    c = xs[np.minimum(np.searchsorted(cw, (np.arange(k) + 0.5) / k), len(xs) - 1)].astype(np.float64)
    for _ in range(iters):
        a = np.searchsorted((c[1:] + c[:-1]) / 2, xs)
        tot = np.bincount(a, ws, k)
        new = np.where(tot > 0, np.bincount(a, ws * xs, k) / np.maximum(tot, 1e-30), c)
        new = np.sort(new)
        if np.allclose(new, c, atol=1e-7):
            break
        c = new
    return c.astype(np.float32)


def qnorm_centroids(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Q-Norm: shift/scale centroids so quantized x keeps x's mean and std."""
    xq = c[np.searchsorted((c[1:] + c[:-1]) / 2, x)]
    sq = xq.std()
    if sq <= 0:
        return c
    return ((c - xq.mean()) * (x.std() / sq) + x.mean()).astype(np.float32)


def _outlier_mask(mag: np.ndarray, n: int) -> np.ndarray:
    if n == 0:
        return np.zeros(mag.shape, bool)
    idx = np.argpartition(-mag, n - 1, axis=-1)[..., :n]
    mask = np.zeros(mag.shape, bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


@calibration.calibrator("kvquant")
def calibrate(stats: dict, config, outliers: float = 0.01, bit_widths=BITS, samples: int = 65536) -> dict:
    """Per-layer key thresholds and Fisher-weighted codebooks (raw and Q-Norm) for every
    bit width, from `calibration.collect(..., grads=True)` statistics [L, T, N, H]."""
    kp, gk, v, gv = stats["k_pre"], stats["gk_pre"], stats["v"], stats["gv"]
    n_out = n_outliers(outliers, config.head_dim)
    p = outliers / 2 if outliers > 0 else 0.0
    lo, hi = np.quantile(kp, p, axis=1), np.quantile(kp, 1 - p, axis=1)  # [L, N, H]
    center, half = (hi + lo) / 2, np.maximum((hi - lo) / 2, 1e-6)
    xk = (kp - center[:, None]) / half[:, None]
    kmask = _outlier_mask(np.abs(xk), n_out)
    vmask = _outlier_mask(np.abs(v), n_out)
    vlo = np.min(np.where(vmask, np.inf, v), axis=-1, keepdims=True)
    vhi = np.max(np.where(vmask, -np.inf, v), axis=-1, keepdims=True)
    xv = (v - (vhi + vlo) / 2) / np.maximum((vhi - vlo) / 2, 1e-6)
    rng = np.random.default_rng(0)
    out = {"k_center": center.astype(np.float32), "k_half": half.astype(np.float32)}
    for b in bit_widths:
        for name, x, g, m in (("k", xk, gk, kmask), ("v", xv, gv, vmask)):
            raw, qn = [], []
            for layer in range(x.shape[0]):
                keep = ~m[layer]
                xs, ws = np.clip(x[layer][keep], -1, 1), g[layer][keep] ** 2
                if len(xs) > samples:
                    pick = rng.choice(len(xs), samples, replace=False)
                    xs, ws = xs[pick], ws[pick]
                c = weighted_kmeans_1d(xs, ws, 2**b)
                raw.append(c)
                qn.append(qnorm_centroids(c, xs))
            out[f"{name}_cb{b}"] = np.stack(raw)
            out[f"{name}_cb{b}_qnorm"] = np.stack(qn)
    return out
