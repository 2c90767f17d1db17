"""The streaming loader: lazy sources read exactly the slices asked for; checkpoints keep their
stored dtype and values; corrupt weights are named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_loaders import _byte_tokenizer

from kvjax.loaders import ModelFileError, load
from kvjax.loaders.sources import ByteCounter, FileTensor, Segments, Transposed, Unpermuted, Window, interleave


def _random_slices(rng, shape):
    out = []
    for n in shape:
        a = int(rng.integers(0, n))
        out.append(slice(a, int(rng.integers(a + 1, n + 1))))
    return tuple(out)


def test_sources_read_exactly_the_slices(tmp_path):
    rng = np.random.default_rng()
    full = rng.standard_normal((12, 40)).astype(ml_dtypes.bfloat16)
    path = tmp_path / "t.bin"
    path.write_bytes(b"\0" * 24 + full.tobytes())
    counter = ByteCounter()
    src = FileTensor(str(path), 24, full.shape, full.dtype, counter)
    for _ in range(20):
        idx = _random_slices(rng, full.shape)
        before = counter.bytes
        got = src.read(idx)
        assert got.dtype == full.dtype and np.array_equal(got.view(np.uint16), full[idx].view(np.uint16)), idx
        assert counter.bytes - before == got.nbytes  # not a byte more than the slice
        idx_t = _random_slices(rng, full.shape[::-1])
        assert np.array_equal(Transposed(src).read(idx_t).view(np.uint16), full.T[idx_t].view(np.uint16))
    # llama.cpp's q/k row order, undone per head (8-dim heads: rows (h, 4, 2) -> (h, 2, 4)).
    heads = 3
    perm = full.reshape(heads, 2, 2, 40).swapaxes(1, 2).reshape(full.shape)  # what llama.cpp stores
    ppath = tmp_path / "p.bin"
    ppath.write_bytes(perm.tobytes())
    un = Unpermuted(FileTensor(str(ppath), 0, full.shape, full.dtype), heads)
    for _ in range(10):
        idx = _random_slices(rng, full.shape)
        assert np.array_equal(un.read(idx).view(np.uint16), full[idx].view(np.uint16)), idx
    # Window / Segments / interleave: a fused matrix laid out in groups, read by any slice.
    a, b = Window(src, 1, 0, 16), Window(src, 1, 16, 40)
    assert np.array_equal(Segments((a, b), 1).read().view(np.uint16), full.view(np.uint16))
    fused = interleave([a, b], 1, 2)
    want = np.concatenate([full[:, 0:8], full[:, 16:28], full[:, 8:16], full[:, 28:40]], axis=1)
    for _ in range(10):
        idx = _random_slices(rng, want.shape)
        assert np.array_equal(fused.read(idx).view(np.uint16), want[idx].view(np.uint16)), idx


def _tiny_hf(tmp_path, torch_dtype):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(int(np.random.default_rng().integers(2**31)))
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch_dtype)
    model.save_pretrained(tmp_path, safe_serialization=True)
    _byte_tokenizer(str(tmp_path))
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_checkpoint_keeps_its_dtype_and_values(tmp_path, stored):
    import torch

    ref = _tiny_hf(tmp_path, getattr(torch, stored))
    model = load(str(tmp_path), fuse_projections=False)
    assert model.dtype == jnp.dtype(stored)
    p = model.params["params"]
    leaves = jax.tree.leaves(p)
    assert {x.dtype for x in leaves} == {jnp.dtype(stored)}
    np.testing.assert_array_equal(
        np.asarray(p["embed_tokens"]["embedding"], np.float32), ref["model.embed_tokens.weight"]
    )
    np.testing.assert_array_equal(np.asarray(p["lm_head"]["kernel"], np.float32), ref["lm_head.weight"].T)
    attn = p["layers_1"]["self_attn"]
    np.testing.assert_array_equal(
        np.asarray(attn["k_proj"]["kernel"], np.float32), ref["model.layers.1.self_attn.k_proj.weight"].T
    )
    norm = p["layers_0"]["post_attention_layernorm"]["scale"]
    np.testing.assert_array_equal(np.asarray(norm, np.float32), ref["model.layers.0.post_attention_layernorm.weight"])
    assert model.load_stats["bytes_read"] == sum(x.nbytes for x in leaves)  # every byte once
    # Fused while loading: q/k/v side by side; a requested dtype converts every tensor.
    fused = load(str(tmp_path), dtype=jnp.float32)
    qkv = fused.params["params"]["layers_1"]["self_attn"]["qkv_proj"]["kernel"]
    assert qkv.dtype == jnp.float32
    want = np.concatenate([ref[f"model.layers.1.self_attn.{n}_proj.weight"].T for n in "qkv"], axis=1)
    np.testing.assert_array_equal(np.asarray(qkv), want)


def test_device_transpose_places_the_same_parameters(tmp_path, monkeypatch):
    """The accelerator path (checkpoint matrices placed as stored, then transposed by the device)
    gives the host path's parameters; forced here on the CPU."""
    import torch

    from kvjax.loaders import place
    from kvjax.parallel import make_mesh

    _tiny_hf(tmp_path, torch.bfloat16)
    host = load(str(tmp_path), mesh=make_mesh(seq=1))
    monkeypatch.setattr(place, "HOST_TRANSPOSE_PLATFORMS", ())
    dev = load(str(tmp_path), mesh=make_mesh(seq=1))
    for a, b in zip(jax.tree.leaves(host.params), jax.tree.leaves(dev.params)):
        assert a.shape == b.shape and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_nonfinite_weight_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    _tiny_hf(tmp_path, __import__("torch").float32)
    f = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(f))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(tensors, str(f))
    with pytest.raises(ModelFileError, match=r"non-finite values in the weight \['params'\]\['layers_1'\]\['mlp'\]"):
        load(str(tmp_path), fuse_projections=False)


def test_truncated_header_is_a_clear_error(tmp_path):
    _tiny_hf(tmp_path, __import__("torch").float32)
    f = next(tmp_path.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(ModelFileError, match=r"unreadable safetensors file \(truncated or corrupt\?\): 5 bytes"):
        load(str(tmp_path))
