"""kvjax.native: the C++ GGUF-block matmul (XLA FFI, CPU) against its jnp reference, the
reference against gguf.quants, the model dispatch, and SmolLM2 with the blocks vs float32."""

from __future__ import annotations

import dataclasses
import platform
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from kvjax.native import QUANTIZED_MAX_ROWS, QuantizedWeight, build, quantized_matmul, quantized_matmul_reference
from kvjax.native.quantized_matmul import TARGETS, _ffi_matmul, dequantize_reference

GGML = {"q4_1": GGMLQuantizationType.Q4_1, "q8_0": GGMLQuantizationType.Q8_0}
TYPES = sorted(GGML)

needs_kernel = pytest.mark.skipif(build.load() is None, reason="no C++ compiler / the kernel did not build")


def _blocks(rng, block_type, n, k):
    """GGUF blocks of a random [n, k] matrix (via gguf.quants.quantize) and their dequantization."""
    w = (rng.standard_normal((n, k)) * rng.uniform(0.1, 3.0, (n, 1))).astype(np.float32)
    blocks = quantize(w, GGML[block_type])
    return blocks, dequantize(blocks, GGML[block_type]).astype(np.float32)


def _assert_close(y, x, w):
    """float32 result vs float64 x @ w.T; bound scaled by sum |x||w| (summation order only)."""
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    scale = np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T
    err = np.abs(np.asarray(y, np.float64) - ref)
    assert np.all(err <= 1e-6 * scale + 1e-30), float((err / (scale + 1e-30)).max())


@pytest.mark.parametrize("block_type", TYPES)
def test_reference_dequantizes_like_gguf(block_type, rng):
    blocks, w = _blocks(rng, block_type, 37, 96)
    np.testing.assert_array_equal(np.asarray(dequantize_reference(blocks, block_type, 96)), w)
    # arbitrary bytes too (finite fp16 scales): the reference must read the layout, not the quantizer's habits
    raw = rng.integers(0, 256, blocks.shape, dtype=np.uint8).reshape(37, 3, -1)
    raw[:, :, 0:2] = np.float16(rng.standard_normal((37, 3, 1))).view(np.uint8)
    if block_type == "q4_1":
        raw[:, :, 2:4] = np.float16(rng.standard_normal((37, 3, 1))).view(np.uint8)
    raw = raw.reshape(blocks.shape)
    np.testing.assert_array_equal(
        np.asarray(dequantize_reference(raw, block_type, 96)), dequantize(raw, GGML[block_type]).astype(np.float32)
    )


@needs_kernel
@pytest.mark.parametrize("block_type", TYPES)
@pytest.mark.parametrize("m,n,k", [(1, 1, 32), (1, 4099, 96), (3, 130, 160), (4, 64, 1536), (9, 33, 224)])
def test_kernel_matches_reference(block_type, m, n, k, rng):
    blocks, w = _blocks(rng, block_type, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    y = jax.jit(lambda x, b: quantized_matmul(x, b, block_type))(x, blocks)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    _assert_close(y, x, w)
    _assert_close(quantized_matmul_reference(x, blocks, block_type), x, w)


@needs_kernel
def test_kernel_leading_axes_and_dtypes(rng):
    blocks, w = _blocks(rng, "q4_1", 48, 64)
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    y = quantized_matmul(jnp.asarray(x, jnp.bfloat16), blocks, "q4_1")
    assert y.shape == (2, 3, 48) and y.dtype == jnp.float32
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    _assert_close(y.reshape(6, 48), xb.reshape(6, 64), w)


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and f" {flag}" in line for line in f)
    except OSError:
        return False


@needs_kernel
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 builds of other SIMD widths")
@pytest.mark.parametrize("arch,simd", [("x86-64", "scalar"), ("haswell", "avx2")])
@pytest.mark.parametrize("block_type", TYPES)
def test_other_simd_builds_match_reference(arch, simd, block_type, rng):
    """The paths that -march=native does not pick on this CPU: portable scalar (compilers/CPUs
    without AVX2, -march=x86-64) and AVX2 (-march=haswell, where the CPU runs it); 5 rows of x
    cover the 4-row register block and its remainder."""
    import ctypes

    if simd == "avx2" and not (_cpu_has("avx2") and _cpu_has("fma")):
        pytest.skip("this CPU cannot run an AVX2 build")
    lib = ctypes.CDLL(build.build(arch_flags=(f"-march={arch}",)))
    assert build.simd(lib) == simd
    build.register(lib, suffix=f"_{simd}")
    blocks, w = _blocks(rng, block_type, 70, 160)
    x = rng.standard_normal((5, 160)).astype(np.float32)
    _assert_close(jax.jit(lambda x, b: _ffi_matmul(x, b, TARGETS[block_type] + f"_{simd}"))(x, blocks), x, w)


def test_bad_inputs_name_the_values(rng):
    blocks, _ = _blocks(rng, "q4_1", 8, 64)
    x = np.ones((1, 64), np.float32)
    with pytest.raises(ValueError, match=r"K=40 must be a multiple of the GGUF block size 32"):
        quantized_matmul(np.ones((1, 40), np.float32), blocks, "q4_1")
    with pytest.raises(ValueError, match=r"blocks.dtype=float32 must be uint8"):
        quantized_matmul(x, blocks.astype(np.float32), "q4_1")
    with pytest.raises(
        ValueError,
        match=r"blocks.shape=\(8, 40\) does not hold q4_1 rows of K=64 weights; "
        r"expected \[N, 40\]|blocks.shape=\(8, 40\)",
    ):
        quantized_matmul(x, blocks, "q8_0")
    with pytest.raises(
        ValueError,
        match=r"blocks.shape=\(8, 39\) does not hold q4_1 rows of K=64 weights; "
        r"expected \[N, 40\]",
    ):
        quantized_matmul(x, blocks[:, :39], "q4_1")
    with pytest.raises(ValueError, match=r"block_type='q4_k' is not supported; expected one of \['q4_1', 'q8_0'\]"):
        quantized_matmul(x, blocks, "q4_k")
    with pytest.raises(ValueError, match=r"x.dtype=int32 must be floating point"):
        quantized_matmul(np.ones((1, 64), np.int32), blocks, "q4_1")


@needs_kernel
def test_the_kernel_checks_shapes_too(rng):
    """The C++ handler's own checks (for callers that skip the Python wrapper)."""
    blocks, _ = _blocks(rng, "q8_0", 8, 64)
    with pytest.raises(Exception, match=r"blocks have 68 bytes per row, expected K/32\*20=40 for K=64"):
        jax.block_until_ready(_ffi_matmul(jnp.ones((1, 64)), blocks, TARGETS["q4_1"]))


def test_fallback_without_compiler_warns_once(monkeypatch, tmp_path, rng):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KVJAX_NATIVE_CACHE", str(tmp_path))
    build.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"native GGUF matmul kernel is unavailable.*no-such-compiler"):
            assert build.load() is None
        blocks, w = _blocks(rng, "q8_0", 16, 64)
        x = rng.standard_normal((2, 64)).astype(np.float32)
        _assert_close(quantized_matmul(x, blocks, "q8_0"), x, w)  # the XLA reference, no second warning
    finally:
        monkeypatch.undo()
        build.load.cache_clear()
        build.load()


# --- the model: dense layers and the tied LM head dispatch on the rows of x ----------------------


def _quantized_params(params, rng):
    """Every 2-D kernel and the tied embedding as QuantizedWeight (q4_1 kernels, q8_0 table); the
    float weights replaced by the blocks' dequantization so both paths compute the same model."""

    def conv(path, leaf):
        name = jax.tree_util.keystr(path)
        if leaf.ndim != 2:
            return leaf
        kind = "q8_0" if "embedding" in name else "q4_1"
        rows = np.asarray(leaf if "embedding" in name else leaf.T, np.float32)  # W [N, K]
        blocks = quantize(rows, GGML[kind])
        deq = dequantize(blocks, GGML[kind]).astype(np.float32)
        return QuantizedWeight(jnp.asarray(deq if "embedding" in name else deq.T), jnp.asarray(blocks), kind)

    return jax.tree_util.tree_map_with_path(conv, params)


def test_fusing_concatenates_the_blocks(rng):
    from kvjax.native.weights import concatenate

    (b1, w1), (b2, w2) = _blocks(rng, "q4_1", 8, 64), _blocks(rng, "q4_1", 16, 64)
    parts = [QuantizedWeight(jnp.asarray(w.T), jnp.asarray(b), "q4_1") for b, w in ((b1, w1), (b2, w2))]
    fused = concatenate(parts, axis=-1)
    assert fused.block_type == "q4_1" and fused.weight.shape == (64, 24) and fused.blocks.shape == (24, 40)
    np.testing.assert_array_equal(np.asarray(fused.blocks), np.concatenate([b1, b2]))
    other = QuantizedWeight(jnp.asarray(w2.T), jnp.asarray(quantize(w2, GGML["q8_0"])), "q8_0")
    mixed = concatenate([parts[0], other], axis=-1)
    assert not isinstance(mixed, QuantizedWeight) and mixed.shape == (64, 24)  # mixed types: float only


@needs_kernel
def test_model_decode_reads_the_blocks(rng):
    """A tiny tied Llama with q4_1 kernels and a q8_0 table, projections fused as kvjax.load does."""
    from helpers import tiny_config

    from kvjax.models import forward, fuse_projections, init_params
    from kvjax.native.weights import float_weight
    from kvjax.policies import Dense
    from kvjax.state import LayerContext

    cfg = tiny_config(
        name="tiny32",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position=64,
        tie_embeddings=True,
        pad_id=0,
    )
    params, cfg = fuse_projections(_quantized_params(init_params(cfg, jax.random.key(0)), rng), cfg)
    assert isinstance(params["params"]["layers_0"]["mlp"]["gate_up_proj"]["kernel"], QuantizedWeight)
    floats = jax.tree_util.tree_map(float_weight, params, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    prompt = jnp.asarray(rng.integers(3, 96, (2, 6)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(6), (2, 6))

    def run(p, tokens, positions, state, phase):
        ctx = LayerContext(0, cfg, prompt_len=6, max_new_tokens=2, phase=phase)
        return forward(p, tokens, positions, state, config=cfg, policy=Dense(), ctx=ctx)

    state = Dense().init_state(cfg, 2, 6, 2, jnp.float32)
    step = jax.jit(run, static_argnums=4)
    # prefill (12 rows) keeps the float path: no custom call in its program
    assert "kvjax_gguf_matmul" not in step.lower(params, prompt, pos, state, "prefill").as_text()
    logits, state = step(floats, prompt, pos, state, "prefill")
    nxt, npos = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), jnp.full((2, 1), 6, jnp.int32)
    hlo = step.lower(params, nxt, npos, state, "decode").as_text()
    assert "kvjax_gguf_matmul_q4_1" in hlo and "kvjax_gguf_matmul_q8_0" in hlo
    dq, _ = step(params, nxt, npos, state, "decode")
    df, _ = step(floats, nxt, npos, state, "decode")
    np.testing.assert_allclose(np.asarray(dq), np.asarray(df), rtol=1e-5, atol=1e-5)


def test_dispatch_is_static_on_rows(rng):
    from kvjax.native.weights import dense_matmul

    blocks, w = _blocks(rng, "q4_1", 32, 64)
    qw = QuantizedWeight(jnp.asarray(w.T), jnp.asarray(blocks), "q4_1")
    f = jax.jit(lambda x, qw: dense_matmul(x, qw, lambda x: x @ qw.weight))
    few = f.lower(jnp.ones((1, QUANTIZED_MAX_ROWS, 64)), qw).as_text()
    many = f.lower(jnp.ones((1, QUANTIZED_MAX_ROWS + 1, 64)), qw).as_text()
    assert ("kvjax_gguf_matmul_q4_1" in few) == (build.load() is not None)
    assert "kvjax_gguf_matmul" not in many


# --- SmolLM2: the shipped GGUF's Q4_1 / Q8_0 blocks vs its float32 weights ----------------------


@pytest.mark.slow
@needs_kernel
def test_smollm2_blocks_match_float32_weights(smollm2):
    from kvjax.generation import generate
    from kvjax.loaders import load
    from kvjax.models import forward
    from kvjax.policies import Dense
    from kvjax.state import LayerContext

    qkv = smollm2.params["params"]["layers_0"]["self_attn"]["qkv_proj"]["kernel"]
    assert isinstance(qkv, QuantizedWeight) and qkv.block_type == "q4_1"
    emb = smollm2.params["params"]["embed_tokens"]["embedding"]
    assert isinstance(emb, QuantizedWeight) and emb.block_type == "q8_0"
    f32 = load("smollm2", quantized_matmul=False)
    assert not isinstance(f32.params["params"]["embed_tokens"]["embedding"], QuantizedWeight)
    cfg = smollm2.config
    ids = smollm2.tokenizer.encode("The history of the city of Rome begins with")
    n = len(ids)

    def run(p, tokens, positions, state, phase):
        return forward(
            p,
            tokens,
            positions,
            state,
            config=cfg,
            policy=Dense(),
            ctx=LayerContext(0, cfg, prompt_len=n, max_new_tokens=1, phase=phase),
        )

    state = Dense().init_state(cfg, 1, n, 1, jnp.float32)
    logits, state = jax.jit(run, static_argnums=4)(
        f32.params, jnp.asarray([ids]), jnp.arange(n)[None], state, "prefill"
    )
    tok, pos = jnp.argmax(logits[:, -1:], -1).astype(jnp.int32), jnp.full((1, 1), n, jnp.int32)
    step = jax.jit(run, static_argnums=4)
    lq, _ = step(smollm2.params, tok, pos, state, "decode")
    lf, _ = step(f32.params, tok, pos, state, "decode")
    rel = float(jnp.linalg.norm(lq - lf) / jnp.linalg.norm(lf))
    assert rel <= 2e-5, rel
    a = generate(smollm2, "The history of the city of Rome begins", max_new_tokens=24, stop_ids=())
    b = generate(f32, "The history of the city of Rome begins", max_new_tokens=24, stop_ids=())
    assert a.tokens[0].tolist() == b.tokens[0].tolist()


@pytest.mark.slow
def test_wheel_ships_the_source(tmp_path):
    root = __file__.rsplit("/tests/", 1)[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), root],
        check=True,
        capture_output=True,
    )
    names = set(zipfile.ZipFile(next(tmp_path.glob("kvjax-*.whl"))).namelist())
    assert {"kvjax/native/gguf_matmul.cc", "kvjax/native/build.py", "kvjax/native/quantized_matmul.py"} <= names


def test_quantized_weight_is_a_pytree_with_a_static_type():
    w = QuantizedWeight(jnp.zeros((64, 8)), jnp.zeros((8, 40), jnp.uint8), "q4_1")
    leaves, tree = jax.tree_util.tree_flatten(w)
    assert len(leaves) == 2 and jax.tree_util.tree_unflatten(tree, leaves).block_type == "q4_1"
    assert dataclasses.replace(w, block_type="q8_0") != w
