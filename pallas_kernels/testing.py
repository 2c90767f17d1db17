"""Test helpers for the kernels: interpret mode off-device, dtype tolerances against the float32
references, output checks (NaN-poisoned outputs must all be overwritten), cross-lowering."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

#: Run kernels in interpret mode unless a GPU is present (the same tests then run on device).
INTERPRET = jax.default_backend() != "gpu"

# (relative Frobenius error, max abs LSE error) by input dtype, against the float32 reference.
# float32 on a GPU goes through tf32 dots (about 3e-4 relative).
_TOL = {
    "float32": (2e-5 if INTERPRET else 2e-3, 1e-4 if INTERPRET else 2e-3),
    "bfloat16": (1.2e-2, 2e-2),
    "float16": (3e-3, 5e-3),
}


def tolerance(dtype) -> tuple[float, float]:
    return _TOL[jnp.dtype(dtype).name]


def assert_attention_close(out, lse, ref_out, ref_lse, dtype, what: str = "") -> None:
    """out/ref_out [..., H], lse/ref_lse [...]: every output written (no NaN: interpret mode
    fills outputs with NaN before the kernel runs), -inf pattern of the LSE identical, and
    errors within the dtype's tolerance."""
    o = np.asarray(jnp.asarray(out, jnp.float32), np.float64)
    r = np.asarray(jnp.asarray(ref_out, jnp.float32), np.float64)
    l, rl = np.asarray(lse, np.float64), np.asarray(ref_lse, np.float64)
    assert o.shape == r.shape and l.shape == rl.shape, f"{what}: shapes {o.shape}/{r.shape}, {l.shape}/{rl.shape}"
    assert not np.isnan(o).any(), f"{what}: {np.isnan(o).sum()} output elements never written (NaN poison)"
    assert not np.isnan(l).any(), f"{what}: {np.isnan(l).sum()} LSE elements never written (NaN poison)"
    np.testing.assert_array_equal(np.isfinite(l), np.isfinite(rl), err_msg=f"{what}: rows that see no key differ")
    rel_tol, lse_tol = tolerance(dtype)
    rel = np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-30)
    assert rel <= rel_tol, f"{what}: relative error {rel:.3g} > {rel_tol:g} for {jnp.dtype(dtype).name}"
    fin = np.isfinite(rl)
    err = np.max(np.abs(l[fin] - rl[fin]), initial=0.0)
    assert err <= lse_tol, f"{what}: LSE error {err:.3g} > {lse_tol:g} for {jnp.dtype(dtype).name}"


def lower_for(platform: str, fn, *args) -> str:
    """Lower `fn(*args)` for another platform ("cuda", "tpu") on this machine: checks that a
    kernel's Triton / Mosaic lowering accepts it without running it. Returns the module text."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
