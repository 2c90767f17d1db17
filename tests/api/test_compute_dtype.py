"""bfloat16 where the device has it, float16 where it does not (a GPU of compute capability < 8.0,
e.g. a T4), chosen by `kvjax.loaders.compute_dtype` and applied by `load` to a checkpoint's own
dtype. The device query is replaced by fakes: no such GPU is needed."""

import types

import jax
import jax.numpy as jnp
import pytest
from helpers import write_byte_tokenizer

from kvjax.loaders import bfloat16_supported, compute_dtype, dtypes, load


def _gpu(cc):
    return types.SimpleNamespace(platform="gpu", compute_capability=cc, device_kind="fake")


@pytest.mark.parametrize(
    "device, supported",
    [
        (_gpu("7.5"), False),  # T4
        (_gpu("7.0"), False),  # V100
        (_gpu("8.0"), True),  # A100
        (_gpu("8.9"), True),  # L4
        (_gpu("9.0"), True),  # H100
        (_gpu("gfx90a"), True),  # ROCm: an architecture name, not a capability
        (types.SimpleNamespace(platform="gpu"), True),  # no capability reported
        (types.SimpleNamespace(platform="tpu"), True),
        (types.SimpleNamespace(platform="cpu"), True),
    ],
)
def test_bfloat16_by_device(device, supported):
    assert bfloat16_supported(device) is supported
    want = jnp.dtype(jnp.bfloat16 if supported else jnp.float16)
    assert compute_dtype(jnp.bfloat16, device) == want
    assert compute_dtype("float32", device) == jnp.float32  # other dtypes pass through
    assert compute_dtype(jnp.float16, device) == jnp.float16


def test_default_device_query(monkeypatch):
    """Without a device argument, the first of `jax.devices()` is asked."""
    monkeypatch.setattr(jax, "devices", lambda *a: [_gpu("7.5")])
    assert compute_dtype(jnp.bfloat16) == jnp.float16
    monkeypatch.setattr(jax, "devices", lambda *a: [_gpu("8.6")])
    assert compute_dtype(jnp.bfloat16) == jnp.bfloat16


def _bf16_checkpoint(path):
    """A one-layer Llama safetensors directory stored in bfloat16 (HF names and config)."""
    import json

    from safetensors.flax import save_file

    d, f, v, h = 32, 64, 256, 16
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    layer = "model.layers.0."
    for name, shape in (("q", (2 * h, d)), ("k", (h, d)), ("v", (h, d)), ("o", (d, 2 * h))):
        shapes[f"{layer}self_attn.{name}_proj.weight"] = shape
    for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
        shapes[f"{layer}mlp.{name}_proj.weight"] = shape
    shapes[layer + "input_layernorm.weight"] = shapes[layer + "post_attention_layernorm.weight"] = (d,)
    keys = jax.random.split(jax.random.key(0), len(shapes))
    tensors = {n: (0.05 * jax.random.normal(k, s)).astype(jnp.bfloat16) for k, (n, s) in zip(keys, shapes.items())}
    save_file(tensors, str(path / "model.safetensors"))
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=v, hidden_size=d, intermediate_size=f,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=h, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False, torch_dtype="bfloat16",
    )  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(str(path))


def test_load_picks_float16_for_a_bfloat16_checkpoint_on_a_t4(tmp_path, monkeypatch):
    """A safetensors directory stored in bfloat16 loads as float16 when the device is a T4 (its
    own dtype elsewhere); an explicit dtype= is kept as given."""
    _bf16_checkpoint(tmp_path)
    assert load(str(tmp_path)).dtype == jnp.bfloat16
    monkeypatch.setattr(dtypes, "_default_device", lambda: _gpu("7.5"))
    t4 = load(str(tmp_path))
    assert t4.dtype == jnp.float16
    assert {x.dtype for x in jax.tree.leaves(t4.params)} == {jnp.dtype(jnp.float16)}
    assert load(str(tmp_path), dtype=jnp.bfloat16).dtype == jnp.bfloat16
