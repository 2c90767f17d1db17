"""Ring attention on 8 fake CPU devices equals single-device attention.

The 8-device checks run in a child process (tests/parallel_child.py), because the device
count is fixed when JAX starts; this suite keeps its single device. Inputs are fresh
random draws each run (the child prints its seed; rerun with `parallel_child.py ring 8 SEED`).
Cases: causal and not, zigzag / striped / contiguous orders, a sliding window, the zigzag
schedule on prefix kernels, GQA (4 query heads per KV head), ragged row lengths (one row
of a few tokens), a length that is not a multiple of the ring (padded), key mass.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_child(check: str, devices: int, timeout: int = 900) -> dict:
    """Run `parallel_child.py CHECK DEVICES` and return the JSON it prints last."""
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "parallel_child.py"), check, str(devices)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=os.path.dirname(HERE),
    )
    assert r.returncode == 0, f"child {check} failed:\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ring():
    return run_child("ring", 8)


# (relative L2 error of outputs, max |lse error|) allowed, by dtype. The reference is the
# float32 jnp attention on the same (rounded) inputs; bf16 outputs carry bf16 rounding.
TOL = {"fp32": (1e-5, 1e-4), "bf16": (1e-2, 1e-3)}
CASES = [
    "fp32_causal_zigzag",
    "fp32_causal_zigzag_kernel",
    "fp32_causal_zigzag_pallas",
    "fp32_causal_striped",
    "fp32_causal_contiguous",
    "fp32_noncausal_zigzag",
    "fp32_window_zigzag",
    "fp32_mass_zigzag",
    "bf16_causal_zigzag",
    "bf16_noncausal_zigzag",
    "bf16_causal_zigzag_kernel",
]


@pytest.mark.parametrize("case", CASES)
def test_ring_matches_single_device(ring, case):
    res = ring[case]
    out_tol, lse_tol = TOL[case[:4]]
    msg = f"{case} seed={ring['seed']} T={ring['T']}: {res}"
    assert res["finite"], msg
    assert res["out"] <= out_tol, msg
    assert res["lse"] <= lse_tol, msg
    if "mass" in res:
        assert res["mass"] <= 1e-5, msg
