"""KIVI: tuning-free asymmetric 2-bit KV cache quantization (Liu et al., arXiv:2402.02750).

Keys are quantized per channel (groups of G tokens share a scale/zero per channel),
values per token (groups of G channels), asymmetric min-max, codes packed into uint32
words (keys along tokens, values along channels: the fused decode kernel's layout), and
the newest tokens stay in a full-precision residual window: a block of G tokens is
quantized when the window holds R + G of them, so the last R tokens are always exact.

State (stream 0): KIVIData(k_codes [B, N, S/per_word, H], k_scale/k_zero [B, N, S/G, H],
v_codes [B, N, S, H/per_word], v_scale/v_zero [B, N, S, H/G]) + residual [B, N, R+G, H].

`layout="fragments"` stores the same codes in the fragment layout of the Hopper kernel
(`pallas_kernels/kivi_mgpu/fragments.py`, read by `kivi_mgpu/kernel.py`; scales in
bf16, f16 for 8-bit codes) and flushes whole 64-token tiles (blocks of lcm(G, 64) tokens);
"auto" (the default) picks it on a Hopper GPU when the kernel takes the shapes (2/4/8 bits, one
width, head_dim a multiple of 64, G in {16, 32} or a multiple of 64), else the standard layout.
"""

from __future__ import annotations

import dataclasses
import math

from flax import struct

from ..pallas_kernels import _compat, packing
from ..pallas_kernels.kivi_mgpu import fragments as kivi_fragments
from ..policies.base import PolicyError
from ..policies.registry import register
from . import affine
from .attention import fused_kivi_attention
from .base import QuantPolicy, check_group, round_up


@struct.dataclass
class KIVIData:
    """KIVI layout (see module doc)."""

    k_codes: object
    k_scale: object
    k_zero: object
    v_codes: object
    v_scale: object
    v_zero: object


@dataclasses.dataclass(frozen=True)
class KIVICodec:
    """Keys channel-wise over `group` tokens, values token-wise over `group` channels."""

    bits: int
    group: int
    head_dim: int
    v_bits: int = 0  # 0: same as bits

    @property
    def vb(self) -> int:
        return self.v_bits or self.bits

    def encode(self, k, v, pos, aux):
        kc, ks, kz = affine.quant_channelwise(k, self.bits, self.group)
        vc, vs, vz = affine.quant_tokenwise(v, self.vb, self.group)
        return KIVIData(kc, ks, kz, vc, vs, vz)

    def decode(self, d: KIVIData, aux):
        k = affine.dequant_channelwise(d.k_codes, d.k_scale, d.k_zero, self.bits, self.group)
        v = affine.dequant_tokenwise(d.v_codes, d.v_scale, d.v_zero, self.vb, self.group, self.head_dim)
        return k, v, None


@dataclasses.dataclass(frozen=True)
class KIVIFragmentCodec:
    """KIVICodec's quantization, stored as `kivi_fragments.KiviFragments` (scales rounded to the
    kernel's operand type, `kivi_fragments.operand_dtype`: bf16, f16 for 8-bit codes); `encode`
    takes whole 64-token tiles."""

    bits: int
    group: int
    head_dim: int

    def encode(self, k, v, pos, aux):
        kc, ks, kz = affine.quant_channelwise(k, self.bits, self.group)
        vc, vs, vz = affine.quant_tokenwise(v, self.bits, self.group)
        return kivi_fragments.to_fragment_layout(kc, ks, kz, vc, vs, vz, bits=self.bits)

    def decode(self, d, aux):
        kc, vc, ks, kz, vs, vz = kivi_fragments.from_fragment_layout(d, bits=self.bits)
        b, n, s, h = kc.shape
        k = affine.dequantize(kc.reshape(b, n, s // self.group, self.group, h), ks[:, :, :, None], kz[:, :, :, None])
        v = affine.dequantize(vc.reshape(b, n, s, h // self.group, self.group), vs[..., None], vz[..., None])
        return k.reshape(b, n, s, h), v.reshape(b, n, s, h), None


def fragments_fit(bits: int, v_bits: int, group: int, head_dim: int | None = None) -> str | None:
    """Why the fragment layout cannot hold this KIVI configuration (None: it can)."""
    if bits not in kivi_fragments.MGPU_BITS or v_bits not in (0, bits):
        return f"bits={bits}, v_bits={v_bits}: the fragment layout holds one width of {kivi_fragments.MGPU_BITS}"
    if group % 16 or not (64 % group == 0 or group % 64 == 0):
        return f"group={group}: the fragment layout needs 16, 32, 64 or a multiple of 64"
    if head_dim is not None and (head_dim % 64 or head_dim > 256):
        return f"head_dim={head_dim}: the fragment layout needs 64, 128, 192 or 256"
    return None


#: The quantized capacity is padded by at most 1/SPLIT_SLACK of itself (`split_capacity`).
SPLIT_SLACK = 16


def split_capacity(tokens: int, block: int) -> int:
    """Capacity for `tokens` quantized tokens: a multiple of `block` (the kernels' token block)
    and of the largest power-of-two multiple of it that pads by at most 1/SPLIT_SLACK.

    The fused decode kernels cut a row's tokens into split-K programs of equal whole blocks, so
    they can only use as many programs as there are power-of-two factors in the block count:
    an odd count (32k tokens + decode headroom - residual window = 511 blocks of 64) leaves one
    program per (row, KV head), a handful of SMs reading the whole cache. Rounding to a coarser
    power-of-two granule keeps at least tokens / (SPLIT_SLACK * 2 * block) splits available
    (e.g. 32,673 tokens -> 32,768 = 512 blocks) for at most 1/SPLIT_SLACK more memory."""
    granule = block
    while granule * 2 * SPLIT_SLACK <= tokens:
        granule *= 2
    return round_up(tokens, granule)


@register
@dataclasses.dataclass(frozen=True)
class KIVI(QuantPolicy):
    """KIVI with `bits` in {2, 3, 4, 8} (`v_bits`: a different width for values, 0 = same),
    group size `group` (G, tokens for keys / channels
    for values), a full-precision residual window of `residual` (R) tokens and a storage
    `layout`: "standard", "fragments" (the Hopper kernel's) or "auto" (module doc)."""

    name = "kivi"
    bits: int = 2
    group: int = 32
    residual: int = 128
    v_bits: int = 0
    layout: str = "auto"

    def __post_init__(self):
        if self.bits not in packing.SUPPORTED_BITS:
            raise PolicyError(f"kivi: bits={self.bits!r} is not supported; expected one of {packing.SUPPORTED_BITS}")
        if self.v_bits and self.v_bits not in packing.SUPPORTED_BITS:
            raise PolicyError(
                f"kivi: v_bits={self.v_bits!r} is not supported; expected 0 or one of {packing.SUPPORTED_BITS}"
            )
        per = packing.codes_per_word(self.bits)
        if self.group <= 0 or self.group % per:
            raise PolicyError(
                f"kivi: group={self.group} must be a positive multiple of {per} "
                f"(the {self.bits}-bit codes one uint32 word holds along tokens)"
            )
        if self.residual < 0 or self.residual % self.group:
            raise PolicyError(f"kivi: residual={self.residual} must be a non-negative multiple of group={self.group}")
        if self.layout not in ("auto", "standard", "fragments"):
            raise PolicyError(
                f"kivi: layout={self.layout!r} is not supported; expected 'auto', 'standard' or 'fragments'"
            )
        if self.layout == "fragments" and (why := fragments_fit(self.bits, self.v_bits, self.group)):
            raise PolicyError(f"kivi: layout='fragments' cannot hold {why}")

    def fragments(self, ctx) -> bool:
        """Whether this layer's cache uses the fragment layout (static per model and device)."""
        if self.layout == "standard":
            return False
        if self.layout == "fragments":
            self.check_config(ctx.config)  # names what does not fit
            return True
        fits = fragments_fit(self.bits, self.v_bits, self.group, ctx.config.head_dim) is None
        return fits and _compat.backend_kind() == "mosaic_gpu"

    def block(self, ctx):
        return math.lcm(self.group, kivi_fragments.TILE) if self.fragments(ctx) else self.group

    def capacity(self, c_in, ctx):
        """Quantized tokens, rounded so the fused decode kernels can split them (`split_capacity`)."""
        return split_capacity(super().capacity(c_in, ctx), math.lcm(self.group, 64))

    def check_config(self, config):
        super().check_config(config)
        if self.layout == "fragments" and (why := fragments_fit(self.bits, self.v_bits, self.group, config.head_dim)):
            raise PolicyError(f"kivi: layout='fragments' cannot hold {why}")
        check_group("kivi", self.group, config.head_dim, "values are quantized per token in groups of channels")

    def codec(self, ctx):
        if self.fragments(ctx):
            return KIVIFragmentCodec(self.bits, self.group, ctx.config.head_dim)
        return KIVICodec(self.bits, self.group, ctx.config.head_dim, self.v_bits)

    def fused_attention(self, state, q, q_pos, ctx):
        if self.v_bits and self.v_bits != self.bits:
            return None  # the fused kernel reads one bit width
        return fused_kivi_attention(state, q, q_pos, ctx, bits=self.bits, group=self.group)
