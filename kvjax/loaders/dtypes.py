"""Which floating dtype a device computes in: bfloat16 where the hardware has it, float16 where
it does not.

NVIDIA GPUs compute bfloat16 natively from compute capability 8.0 (Ampere: A100, L4, RTX 30xx
and later); below it (T4: 7.5, V100: 7.0) XLA emulates bfloat16 matmuls through float32, slowly,
and Triton kernels do not take bfloat16 at all. There a bfloat16 checkpoint is computed in
float16 instead: the same 2 bytes per value and tensor-core matmuls, with 3 more mantissa bits
and a range that ends at 65504 (a weight or activation past it overflows to inf; `load`'s
`check_finite` reports such weights). CPUs, TPUs and GPUs that report no compute capability
(ROCm reports an architecture name) keep bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

#: The first NVIDIA compute capability with native bfloat16 (Ampere).
BFLOAT16_MIN_CAPABILITY = (8, 0)


def _capability(device) -> tuple[int, int] | None:
    """(major, minor) of an NVIDIA device's `compute_capability` ("7.5"), else None."""
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return None
    parts = str(cc).split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:  # not "major.minor" (e.g. a ROCm architecture name)
        return None


def _default_device():
    return jax.devices()[0]


def bfloat16_supported(device=None) -> bool:
    """Whether `device` (default: `jax.devices()[0]`) computes bfloat16 natively: False only for
    a GPU whose compute capability is below 8.0 (module docstring)."""
    device = _default_device() if device is None else device
    if getattr(device, "platform", None) != "gpu":
        return True
    cc = _capability(device)
    return cc is None or cc >= BFLOAT16_MIN_CAPABILITY


def compute_dtype(dtype, device=None) -> jnp.dtype:
    """`dtype` as `device` (default: `jax.devices()[0]`) should compute it: bfloat16 becomes
    float16 where bfloat16 is not supported (`bfloat16_supported`); every other dtype, and
    bfloat16 elsewhere, is returned unchanged. `kvjax.loaders.load` applies it to a checkpoint's
    own dtype when no `dtype=` is given."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16 and not bfloat16_supported(device):
        return jnp.dtype(jnp.float16)
    return dtype


__all__ = ["BFLOAT16_MIN_CAPABILITY", "bfloat16_supported", "compute_dtype"]
