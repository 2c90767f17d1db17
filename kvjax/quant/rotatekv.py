"""RotateKV (Su et al., arXiv:2501.16383): 2-bit KV quantization after outlier-aware
Walsh-Hadamard rotations.

Keys: RoPE is undone (pre-RoPE rotation), channels are reordered with an offline
permutation (channels sorted by their calibration sum, as the paper's reordering
calibration does), the `head_group` heads of a group are concatenated and rotated by an
orthonormal fast Walsh-Hadamard transform (grouped-head rotation), then quantized per
token (asymmetric, groups of `group` rotated channels, range scaled by `clip`). Values
are Hadamard-rotated per head and quantized per token. Dequantization rotates back,
un-permutes and re-applies RoPE at the stored position.

Attention sinks (attention-sink-aware quantization) stay in full precision: the paper
finds them through massive activations of the hidden state, which a cache policy does
not see; here the `sinks` tokens that received the most attention mass during the
prompt's prefill are kept (the tokens those activations point at). When RotateKV
ingests another policy's kept slots (Compose), no attention is available and the
`sinks` earliest kept tokens are protected (StreamingLLM's sinks).

head_group > 1 needs every head of a group to hold the same tokens, i.e. no per-head
eviction before it; SmolLM2 (3 KV heads of 64) admits only head_group=1.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from ..pallas_kernels import packing
from ..policies.base import PolicyError
from ..policies.registry import register
from . import affine, calibration
from .base import QuantPolicy, check_group, rope_heads


def _group_heads(x, g):
    """[B, N, S, H] -> [B, N/g, S, g*H] (heads of a group side by side)."""
    b, n, s, h = x.shape
    return x.reshape(b, n // g, g, s, h).transpose(0, 1, 3, 2, 4).reshape(b, n // g, s, g * h)


def _ungroup_heads(x, g, h):
    b, ng, s, _ = x.shape
    return x.reshape(b, ng, s, g, h).transpose(0, 1, 3, 2, 4).reshape(b, ng * g, s, h)


@dataclasses.dataclass(frozen=True)
class RotateKVCodec:
    bits: int
    group: int
    clip: float
    head_group: int
    config: object
    perm: object  # [N / head_group, head_group * H] channel order of each head group

    def encode(self, k, v, pos, aux):
        g, h = self.head_group, k.shape[-1]
        kp = _group_heads(rope_heads(k, pos, self.config, inverse=True), g)
        perm = jnp.asarray(self.perm)[None, :, None, :]
        kr = _ungroup_heads(affine.fwht(jnp.take_along_axis(kp, perm, axis=-1)), g, h)
        kc, ks, kz = affine.quant_tokenwise(kr, self.bits, self.group, self.clip)
        vc, vs, vz = affine.quant_tokenwise(affine.fwht(v), self.bits, self.group, self.clip)
        return {
            "k_codes": kc,
            "k_scale": ks,
            "k_zero": kz,
            "v_codes": vc,
            "v_scale": vs,
            "v_zero": vz,
            "pos": pos.astype(jnp.int32),
        }

    def decode(self, d, aux):
        g, h = self.head_group, self.config.head_dim
        kr = affine.dequant_tokenwise(d["k_codes"], d["k_scale"], d["k_zero"], self.bits, self.group, h)
        kp = affine.fwht(_group_heads(kr, g))
        inv = jnp.argsort(jnp.asarray(self.perm), axis=-1)[None, :, None, :]
        kp = _ungroup_heads(jnp.take_along_axis(kp, inv, axis=-1), g, h)
        v = affine.fwht(affine.dequant_tokenwise(d["v_codes"], d["v_scale"], d["v_zero"], self.bits, self.group, h))
        return rope_heads(kp, d["pos"], self.config), v, d["pos"]


@register
@dataclasses.dataclass(frozen=True)
class RotateKV(QuantPolicy):
    """RotateKV at `bits` (2 in the paper); `group`: rotated channels per scale (0 = the
    whole head); `sinks`: full-precision attention-sink tokens; `head_group`: heads
    rotated together; `calibration`: artifact directory ("" = shipped)."""

    name = "rotatekv"
    bits: int = 2
    group: int = 0
    clip: float = 1.0
    sinks: int = 4
    head_group: int = 1
    residual: int = 0
    calibration: str = ""
    needs_positions = True

    def __post_init__(self):
        if self.bits not in packing.SUPPORTED_BITS:
            raise PolicyError(
                f"rotatekv: bits={self.bits!r} is not supported; expected one of {packing.SUPPORTED_BITS}"
            )
        if not 0 < self.clip <= 1:
            raise PolicyError(f"rotatekv: clip={self.clip!r} must be in (0, 1]")
        if self.sinks < 0 or self.residual < 0 or self.head_group < 1:
            raise PolicyError(
                f"rotatekv: sinks={self.sinks}, residual={self.residual} must be >= 0 and "
                f"head_group={self.head_group} >= 1"
            )

    def check_config(self, config):
        super().check_config(config)
        g, h = self.head_group, config.head_dim
        if config.num_kv_heads % g or (g * h) & (g * h - 1):
            raise PolicyError(
                f"rotatekv: head_group={g} must divide num_kv_heads={config.num_kv_heads} with "
                f"head_group * head_dim = {g * h} a power of two (Walsh-Hadamard size)"
            )
        check_group("rotatekv", self.group or h, h, "rotated channels per scale")
        a = calibration.load(self.name, config, self.calibration)
        if f"perm_g{g}" not in a:
            raise PolicyError(f"rotatekv: the calibration has no permutation for head_group={g}")

    def codec(self, ctx):
        a = calibration.load(self.name, ctx.config, self.calibration)
        h = ctx.config.head_dim
        return RotateKVCodec(
            self.bits, self.group or h, self.clip, self.head_group, ctx.config, a[f"perm_g{self.head_group}"][ctx.layer]
        )

    def wants_mass(self, ctx):
        return self.sinks > 0

    def prompt_scores(self, state, q, q_pos, res, ctx):
        return None if res.key_mass is None else res.key_mass

    def ingest(self, slots_state, ctx):
        if self.head_group > 1:
            raise PolicyError(
                f"rotatekv: head_group={self.head_group} rotates heads together, which needs the "
                "same tokens in every head; after a per-head eviction policy use head_group=1"
            )
        return super().ingest(slots_state, ctx)

    def sink_count(self):
        return self.sinks

    def sink_rank(self, pos, scores):
        return -pos.astype(jnp.float32) if scores is None else scores  # no attention: earliest tokens


@calibration.calibrator("rotatekv")
def calibrate(stats: dict, config) -> dict:
    """Channel orders [L, N/g, g*H] (ascending calibration sum of pre-RoPE keys) for every
    admissible head group g."""
    kp = stats["k_pre"]  # [L, T, N, H]
    n, h = config.num_kv_heads, config.head_dim
    out = {}
    for g in range(1, n + 1):
        if n % g or (g * h) & (g * h - 1):
            continue
        sums = kp.sum(axis=1).reshape(kp.shape[0], n // g, g * h)
        out[f"perm_g{g}"] = np.argsort(sums, axis=-1, kind="stable").astype(np.int32)
    return out
