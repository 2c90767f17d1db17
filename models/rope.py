"""Rotary position embeddings (RoFormer), rotate-half layout as in HF Llama.

`apply_rope` rotates, `invert_rope` undoes it exactly (the rotation is orthogonal), so
policies that work on pre-RoPE keys (KVQuant, RotateKV, ShadowKV) can recover them.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .config import LlamaConfig, RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Per-pair inverse frequencies [head_dim // 2], with Llama-3.1 or linear scaling."""
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if scaling is None:
        return inv.astype(np.float32)
    if scaling.kind == "linear":
        return (inv / scaling.factor).astype(np.float32)
    if scaling.kind != "llama3":
        raise ValueError(f"unknown rope scaling kind={scaling.kind!r}; expected 'llama3' or 'linear'")
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = np.where(wavelen > low_wavelen, inv / scaling.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    scaled = np.where(mid, (1 - smooth) * inv / scaling.factor + smooth * inv, scaled)
    return scaled.astype(np.float32)


def _cos_sin(positions: jnp.ndarray, cfg: LlamaConfig):
    inv = jnp.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    angles = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # [B, T, 1, H]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, cfg: LlamaConfig) -> jnp.ndarray:
    """Rotate x [B, T, N, H] by positions [B, T] (computed in float32, cast back)."""
    cos, sin = _cos_sin(positions, cfg)
    xf = x.astype(jnp.float32)
    return (xf * cos + _rotate_half(xf) * sin).astype(x.dtype)


def invert_rope(x: jnp.ndarray, positions: jnp.ndarray, cfg: LlamaConfig) -> jnp.ndarray:
    """Undo `apply_rope`: x [B, T, N, H] rotated at positions [B, T] -> pre-RoPE x."""
    cos, sin = _cos_sin(positions, cfg)
    xf = x.astype(jnp.float32)
    return (xf * cos - _rotate_half(xf) * sin).astype(x.dtype)
