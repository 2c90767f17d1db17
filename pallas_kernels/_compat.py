"""Version-tolerant access to the Pallas backends, and the kernels' `backend` vocabulary.

Every kernel imports Pallas through this module so that a missing backend (no Mosaic GPU
in an old jaxlib, no TPU interpreter) disables only the kernels that need it.

`backend=` of a kernel entry point names how it runs, one of `KERNEL_BACKENDS`:
  "mosaic_gpu"  Mosaic GPU lowering (Hopper and newer),
  "triton"      Triton lowering (any CUDA GPU; also what `interpret=True` runs on CPU),
  "mosaic_tpu"  Mosaic TPU lowering (`interpret=True`: the TPU interpreter on CPU),
  "reference"   the kernel's pure-jnp `*_reference` (what XLA runs where no lowering applies),
or None: `backend_kind()` for the default device ("triton" with `interpret=True`). The old
spelling "xla" for the reference still works, with a DeprecationWarning. Which of the
reference or the kernels `kvjax.attention.attend` uses is its own `implementation=` knob.
"""

from __future__ import annotations

import functools
import warnings

import jax
from jax.experimental import pallas as pl

try:  # Triton lowering (any CUDA GPU, also pre-Hopper).
    from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover - very old jax
    pltriton = None

try:  # Mosaic GPU (Hopper and newer).
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover
    plgpu = None

try:  # Mosaic TPU.
    from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
    pltpu = None

__all__ = [
    "BACKENDS",
    "KERNEL_BACKENDS",
    "backend_kind",
    "pl",
    "plgpu",
    "pltpu",
    "pltriton",
    "resolve_backend",
    "tpu_interpret_params",
    "triton_params",
]

BACKENDS = ("triton", "mosaic_gpu", "mosaic_tpu")  # the Pallas lowerings
KERNEL_BACKENDS = (*BACKENDS, "reference")
RENAMED = {"xla": "reference"}  # old spelling -> new, accepted with a DeprecationWarning


def triton_params(num_warps: int, num_stages: int):
    """Compiler params for the Triton lowering (class renamed across jax versions)."""
    cls = getattr(pltriton, "CompilerParams", None) or pltriton.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def has_tpu_interpreter() -> bool:
    """Whether this jax can run Mosaic TPU kernels on CPU (`force_tpu_interpret_mode` era)."""
    return pltpu is not None and hasattr(pltpu, "force_tpu_interpret_mode") and hasattr(pltpu, "InterpretParams")


def tpu_interpret_params():
    """`interpret=` value that runs a Mosaic TPU kernel in the TPU interpreter (on CPU)."""
    if not has_tpu_interpreter():
        raise RuntimeError(f"jax {jax.__version__} has no TPU interpret mode (pltpu.InterpretParams)")
    return pltpu.InterpretParams()


@functools.cache
def _device_kind(platform: str) -> str:
    devs = [d for d in jax.devices() if d.platform == platform]
    return devs[0].device_kind if devs else ""


def is_hopper_or_newer() -> bool:
    """True for a CUDA device of compute capability >= 9.0 (where Mosaic GPU applies)."""
    if jax.default_backend() != "gpu":
        return False
    dev = jax.devices()[0]
    cc = getattr(dev, "compute_capability", None)
    if cc is None:
        return any(s in _device_kind("gpu") for s in ("H100", "H200", "H800", "GH200", "B200", "GB200"))
    return float(cc) >= 9.0


def backend_kind() -> str:
    """The kernel backend for the default device: 'mosaic_gpu', 'triton', 'mosaic_tpu', or
    'reference' where Pallas has no lowering (CPU)."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "mosaic_tpu"
    if platform == "gpu":
        is_cuda = "rocm" not in jax.devices()[0].client.platform_version.lower()
        if is_cuda and plgpu is not None and is_hopper_or_newer():
            return "mosaic_gpu"
        return "triton"
    return "reference"


def renamed(name, renames: dict, what: str, stacklevel: int = 3):
    """`name`, or its new spelling (with a DeprecationWarning) when `renames` maps it."""
    if isinstance(name, str) and name in renames:
        new = renames[name]
        warnings.warn(
            f"{what}={name!r} is deprecated; use {what}={new!r} (the same thing)",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return new
    return name


def resolve_backend(backend: str | None, interpret: bool, allowed: tuple[str, ...] = KERNEL_BACKENDS) -> str:
    """A kernel entry point's `backend` argument -> one of `allowed` (module doc)."""
    backend = renamed(backend, RENAMED, "backend", stacklevel=4)
    if backend is None:
        backend = "triton" if interpret else backend_kind()
    check_backend(backend, allowed)
    return backend


def check_backend(backend: str, allowed: tuple[str, ...]) -> None:
    if backend not in allowed:
        raise ValueError(f"backend={backend!r} is not supported by this kernel; expected one of {allowed}")
