"""KV4: COMET-style 4-bit keys and values with fine-grained mixed precision (Liu et al.,
"COMET: Towards Practical W4A4KV4 LLMs Serving", arXiv:2410.12168).

COMET's FMPQ splits activation channels into blocks, permutes channels offline so the
outlier channels gather in a few blocks, and keeps only those blocks in INT8 while the
rest is INT4, with per-token asymmetric scales. Applied to the cache: each token's key
and value vectors (per head) are permuted with an offline order (channels by descending
calibration max |x|), the first `outlier_blocks` blocks of `block_size` channels are
quantized to 8 bits and the remaining channels to `bits` (4 for KV4), each part with one
float16 scale/zero per token.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..pallas_kernels import packing
from ..policies.base import PolicyError
from ..policies.registry import register
from . import affine, calibration
from .base import QuantPolicy


@dataclasses.dataclass(frozen=True)
class KV4Codec:
    bits: int
    hi: int  # channels kept at 8 bits
    head_dim: int
    k_perm: object
    v_perm: object

    def encode(self, k, v, pos, aux):
        out, h = {}, self.head_dim
        for name, x, perm in (("k", k, self.k_perm), ("v", v, self.v_perm)):
            xp = jnp.take_along_axis(x, jnp.asarray(perm)[None, :, None, :], axis=-1)
            if self.hi:
                out[f"{name}_hi"] = affine.quant_tokenwise(xp[..., : self.hi], 8, self.hi)
            out[f"{name}_lo"] = affine.quant_tokenwise(xp[..., self.hi :], self.bits, h - self.hi)
        return out

    def decode(self, d, aux):
        res, h = [], self.head_dim
        for name, perm in (("k", self.k_perm), ("v", self.v_perm)):
            parts = []
            if self.hi:
                parts.append(affine.dequant_tokenwise(*d[f"{name}_hi"], 8, self.hi, self.hi))
            parts.append(affine.dequant_tokenwise(*d[f"{name}_lo"], self.bits, h - self.hi, h - self.hi))
            xp = jnp.concatenate(parts, axis=-1)
            inv = jnp.argsort(jnp.asarray(perm), axis=-1)[None, :, None, :]
            res.append(jnp.take_along_axis(xp, inv, axis=-1))
        return res[0], res[1], None


@register
@dataclasses.dataclass(frozen=True)
class KV4(QuantPolicy):
    """COMET KV4: `bits` (4) for ordinary channels, 8 bits for `outlier_blocks` blocks of
    `block_size` channels that the offline permutation fills with the outlier channels."""

    name = "kv4"
    bits: int = 4
    block_size: int = 16
    outlier_blocks: int = 1
    residual: int = 0
    calibration: str = ""

    def __post_init__(self):
        if self.bits not in packing.SUPPORTED_BITS:
            raise PolicyError(f"kv4: bits={self.bits!r} is not supported; expected one of {packing.SUPPORTED_BITS}")
        if self.block_size < 1 or self.outlier_blocks < 0 or self.residual < 0:
            raise PolicyError(
                f"kv4: block_size={self.block_size} must be >= 1, outlier_blocks="
                f"{self.outlier_blocks} and residual={self.residual} >= 0"
            )

    def check_config(self, config):
        super().check_config(config)
        h, hi = config.head_dim, self.block_size * self.outlier_blocks
        if h % self.block_size or hi >= h:
            raise PolicyError(
                f"kv4: block_size={self.block_size} must divide head_dim={h} and the "
                f"{self.outlier_blocks} outlier block(s) ({hi} channels) must leave 4-bit channels"
            )
        calibration.load(self.name, config, self.calibration)

    def codec(self, ctx):
        a = calibration.load(self.name, ctx.config, self.calibration)
        return KV4Codec(
            self.bits,
            self.block_size * self.outlier_blocks,
            ctx.config.head_dim,
            a["k_perm"][ctx.layer],
            a["v_perm"][ctx.layer],
        )


@calibration.calibrator("kv4")
def calibrate(stats: dict, config) -> dict:
    """Channel orders [L, N, H]: descending calibration max |x| (post-RoPE keys, values),
    so the first blocks hold the outlier channels."""
    return {
        f"{n}_perm": np.argsort(-np.abs(stats[s]).max(axis=1), axis=-1, kind="stable").astype(np.int32)
        for n, s in (("k", "k_post"), ("v", "v"))
    }
