"""Block floating point KV cache with offline channel reordering (Trukhanov & Soloveychik,
"Accurate Block Quantization in LLMs with Outliers", arXiv:2403.20137).

Every token's key and value vectors are split into blocks of `block` channels; a block
stores one shared power-of-two exponent (int8) and `bits`-bit sign-magnitude mantissas
(m in [-(2^(bits-1)-1), 2^(bits-1)-1], x ~= m * 2^e). Outlier channels would force a
large exponent on their whole block, so the channels are first permuted with an order
computed offline (channels sorted by mean calibration magnitude, per layer and head),
which puts the outlier channels into the same blocks. The permutation is a constant of
the compiled program (the paper folds it into the weights at compile time).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..pallas_kernels import packing
from ..policies.base import PolicyError
from ..policies.registry import register
from . import affine, calibration
from .base import QuantPolicy, check_group


def bfp_encode(x, bits: int, block: int):
    """x [..., H] -> (codes int32 [..., H] in [0, 2*mmax], exponents int8 [..., H/block])."""
    mmax = 2 ** (bits - 1) - 1
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // block, block)
    amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
    e = jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30) / mmax))
    e = jnp.where(amax > mmax * jnp.exp2(e), e + 1, e)
    e = jnp.clip(jnp.where(amax > 0, e, -127), -127, 127)
    m = jnp.clip(jnp.round(xb / jnp.exp2(e)), -mmax, mmax)
    return (m + mmax).astype(jnp.int32).reshape(x.shape), e[..., 0].astype(jnp.int8)


def bfp_decode(codes, exps, bits: int, block: int):
    mmax = 2 ** (bits - 1) - 1
    m = (codes - mmax).astype(jnp.float32)
    mb = m.reshape(*m.shape[:-1], m.shape[-1] // block, block)
    return (mb * jnp.exp2(exps.astype(jnp.float32))[..., None]).reshape(m.shape)


@dataclasses.dataclass(frozen=True)
class BFPCodec:
    bits: int
    block: int
    head_dim: int
    k_perm: object  # [N, H]
    v_perm: object

    def encode(self, k, v, pos, aux):
        out = {}
        for name, x, perm in (("k", k, self.k_perm), ("v", v, self.v_perm)):
            xp = jnp.take_along_axis(x, jnp.asarray(perm)[None, :, None, :], axis=-1)
            codes, exps = bfp_encode(xp, self.bits, self.block)
            out[f"{name}_codes"], out[f"{name}_exp"] = affine.pack(codes, self.bits, axis=3), exps
        return out

    def decode(self, d, aux):
        res = []
        for name, perm in (("k", self.k_perm), ("v", self.v_perm)):
            codes = affine.unpack(d[f"{name}_codes"], self.bits, 3, self.head_dim)
            xp = bfp_decode(codes, d[f"{name}_exp"], self.bits, self.block)
            inv = jnp.argsort(jnp.asarray(perm), axis=-1)[None, :, None, :]
            res.append(jnp.take_along_axis(xp, inv, axis=-1))
        return res[0], res[1], None


@register
@dataclasses.dataclass(frozen=True)
class BFP(QuantPolicy):
    """Block floating point: `bits`-bit mantissas (sign included), one int8 exponent per
    `block_size` channels, channels reordered offline (`reorder=False` keeps the natural order:
    the paper's baseline)."""

    name = "bfp"
    bits: int = 4
    block_size: int = 16
    reorder: bool = True
    residual: int = 0
    calibration: str = ""

    def __post_init__(self):
        if self.bits not in packing.SUPPORTED_BITS:
            raise PolicyError(f"bfp: bits={self.bits!r} is not supported; expected one of {packing.SUPPORTED_BITS}")
        if self.residual < 0:
            raise PolicyError(f"bfp: residual={self.residual} must be >= 0")

    def check_config(self, config):
        super().check_config(config)
        check_group("bfp", self.block_size, config.head_dim, "channels sharing one exponent")
        if self.reorder:
            calibration.load(self.name, config, self.calibration)

    def codec(self, ctx):
        h, n = ctx.config.head_dim, ctx.config.num_kv_heads
        if self.reorder:
            a = calibration.load(self.name, ctx.config, self.calibration)
            kp, vp = a["k_perm"][ctx.layer], a["v_perm"][ctx.layer]
        else:
            kp = vp = np.tile(np.arange(h, dtype=np.int32), (n, 1))
        return BFPCodec(self.bits, self.block_size, h, kp, vp)


@calibration.calibrator("bfp")
def calibrate(stats: dict, config) -> dict:
    """Channel orders [L, N, H]: descending mean |x| of post-RoPE keys and of values."""
    return {
        f"{n}_perm": np.argsort(-np.abs(stats[s]).mean(axis=1), axis=-1, kind="stable").astype(np.int32)
        for n, s in (("k", "k_post"), ("v", "v"))
    }
