"""Named model presets. Full-size presets are checked with `jax.eval_shape` in tests."""

from __future__ import annotations

from .config import LlamaConfig, RopeScaling

SMOLLM2_135M = LlamaConfig(
    name="smollm2-135m",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_layers=30,
    num_heads=9,
    num_kv_heads=3,
    head_dim=64,
    rope_theta=100000.0,
    rms_norm_eps=1e-5,
    max_position=8192,
    tie_embeddings=True,
    bos_id=1,
    eos_ids=(2,),
    pad_id=2,
)

LLAMA2_7B = LlamaConfig(
    name="llama2-7b",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_layers=32,
    num_heads=32,
    num_kv_heads=32,
    head_dim=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    max_position=4096,
    bos_id=1,
    eos_ids=(2,),
    pad_id=0,
)

LLAMA3_1_8B = LlamaConfig(
    name="llama3.1-8b",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    rms_norm_eps=1e-5,
    max_position=131072,
    bos_id=128000,
    eos_ids=(128001, 128008, 128009),
    pad_id=128004,
)

MISTRAL_7B = LlamaConfig(
    name="mistral-7b",
    vocab_size=32768,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    max_position=32768,
    bos_id=1,
    eos_ids=(2,),
    pad_id=0,
)

QWEN2_7B = LlamaConfig(
    name="qwen2-7b",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_layers=28,
    num_heads=28,
    num_kv_heads=4,
    head_dim=128,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    max_position=32768,
    qkv_bias=True,
    bos_id=None,
    eos_ids=(151643, 151645),
    pad_id=151643,
)

_LLAMA3_2 = dict(
    vocab_size=128256,
    num_heads=32,
    num_kv_heads=8,
    rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
    rms_norm_eps=1e-5,
    max_position=131072,
    tie_embeddings=True,
    bos_id=128000,
    eos_ids=(128001, 128008, 128009),
    pad_id=128004,
)
LLAMA3_2_1B = LlamaConfig(
    name="llama3.2-1b", hidden_size=2048, intermediate_size=8192, num_layers=16, head_dim=64, **_LLAMA3_2
)
LLAMA3_2_3B = LlamaConfig(
    name="llama3.2-3b",
    hidden_size=3072,
    intermediate_size=8192,
    num_layers=28,
    head_dim=128,
    **{**_LLAMA3_2, "num_heads": 24},
)

PRESETS: dict[str, LlamaConfig] = {
    c.name: c for c in (SMOLLM2_135M, LLAMA2_7B, LLAMA3_1_8B, LLAMA3_2_1B, LLAMA3_2_3B, MISTRAL_7B, QWEN2_7B)
}


def get_preset(name: str) -> LlamaConfig:
    """Return the preset called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None
