"""Naive per-token round-to-nearest baseline: every token's key and value quantized
on arrival, asymmetric min-max over all `head_dim` channels of a head, no residual
window. The contrast row for the quantization table (per-token keys are what breaks)."""

from __future__ import annotations

import dataclasses

from flax import struct

from ..pallas_kernels import packing
from ..policies.base import PolicyError
from ..policies.registry import register
from . import affine
from .base import QuantPolicy


@struct.dataclass
class TokenwiseData:
    """codes [B, N, S, H/per_word] uint32; scale/zero [B, N, S, H/G] float16 (k and v)."""

    k_codes: object
    k_scale: object
    k_zero: object
    v_codes: object
    v_scale: object
    v_zero: object


@dataclasses.dataclass(frozen=True)
class TokenwiseCodec:
    """Keys and values both token-wise in groups of `group` channels."""

    bits: int
    group: int
    head_dim: int

    def encode(self, k, v, pos, aux):
        return TokenwiseData(
            *affine.quant_tokenwise(k, self.bits, self.group), *affine.quant_tokenwise(v, self.bits, self.group)
        )

    def decode(self, d, aux):
        k = affine.dequant_tokenwise(d.k_codes, d.k_scale, d.k_zero, self.bits, self.group, self.head_dim)
        v = affine.dequant_tokenwise(d.v_codes, d.v_scale, d.v_zero, self.bits, self.group, self.head_dim)
        return k, v, None


@register
@dataclasses.dataclass(frozen=True)
class RTN(QuantPolicy):
    """Per-token round-to-nearest K and V at `bits` (one scale/zero per token per head)."""

    name = "rtn"
    bits: int = 4
    residual: int = 0

    def __post_init__(self):
        if self.bits not in packing.SUPPORTED_BITS:
            raise PolicyError(f"rtn: bits={self.bits!r} is not supported; expected one of {packing.SUPPORTED_BITS}")
        if self.residual < 0:
            raise PolicyError(f"rtn: residual={self.residual} must be >= 0")

    def codec(self, ctx):
        h = ctx.config.head_dim
        return TokenwiseCodec(self.bits, h, h)
