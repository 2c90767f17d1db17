"""Named model presets. Full-size presets are checked with `jax.eval_shape` in tests."""

from __future__ import annotations

from .config import GLOBAL, LOCAL, LlamaConfig, RopeScaling

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

# ---- Qwen3 (dense): q/k RMSNorm per head, no biases ------------------------------------------
_QWEN3 = dict(
    model_type="qwen3", vocab_size=151936, head_dim=128, num_kv_heads=8, rope_theta=1000000.0, rms_norm_eps=1e-6,
    max_position=40960, qk_norm=True, bos_id=151643, eos_ids=(151645,), pad_id=151643,
)  # fmt: skip


def _qwen3(size, hidden, inter, layers, heads, tie):
    return LlamaConfig(
        name=f"qwen3-{size}", hidden_size=hidden, intermediate_size=inter, num_layers=layers, num_heads=heads,
        tie_embeddings=tie, **_QWEN3,
    )  # fmt: skip


QWEN3 = [
    _qwen3("0.6b", 1024, 3072, 28, 16, True),
    _qwen3("1.7b", 2048, 6144, 28, 16, True),
    _qwen3("4b", 2560, 9728, 36, 32, True),
    _qwen3("8b", 4096, 12288, 36, 32, False),
    _qwen3("14b", 5120, 17408, 40, 40, False),
    _qwen3("32b", 5120, 25600, 64, 64, False),
]

# ---- Gemma 2 / Gemma 3: sandwich norms, GeGLU, sqrt(d) embeddings, local + global layers -----
_GEMMA = dict(
    norm_offset=1.0, sandwich_norms=True, embed_scale=True, hidden_act="gelu_tanh", rms_norm_eps=1e-6,
    tie_embeddings=True, bos_id=2, pad_id=0,
)  # fmt: skip


def _gemma2(size, hidden, inter, layers, heads, kv, head_dim, scalar):
    return LlamaConfig(
        name=f"gemma2-{size}", model_type="gemma2", vocab_size=256000, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, query_pre_attn_scalar=scalar,
        attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096, max_position=8192,
        layer_types=tuple(LOCAL if i % 2 == 0 else GLOBAL for i in range(layers)), rope_theta=10000.0,
        eos_ids=(1, 107), **_GEMMA,
    )  # fmt: skip


def _gemma3(size, hidden, inter, layers, heads, kv, head_dim, scalar, window, scaling, vocab=262208):
    return LlamaConfig(
        name=f"gemma3-{size}", model_type="gemma3", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=head_dim, query_pre_attn_scalar=scalar,
        sliding_window=window, max_position=131072 if scaling else 32768, qk_norm=True,
        layer_types=tuple(LOCAL if (i + 1) % 6 else GLOBAL for i in range(layers)), rope_theta=1000000.0,
        rope_scaling=RopeScaling("linear", 8.0) if scaling else None, local_rope_theta=10000.0, eos_ids=(1, 106),
        **_GEMMA,
    )  # fmt: skip


GEMMA2 = [
    _gemma2("2b", 2304, 9216, 26, 8, 4, 256, 256.0),
    _gemma2("9b", 3584, 14336, 42, 16, 8, 256, 256.0),
    _gemma2("27b", 4608, 36864, 46, 32, 16, 128, 144.0),
]
GEMMA3 = [  # the language models (4b and up also ship a vision tower, not counted here)
    _gemma3("1b", 1152, 6912, 26, 4, 1, 256, 256.0, 512, False, vocab=262144),
    _gemma3("4b", 2560, 10240, 34, 8, 4, 256, 256.0, 1024, True),
    _gemma3("12b", 3840, 15360, 48, 16, 8, 256, 256.0, 1024, True),
    _gemma3("27b", 5376, 21504, 62, 32, 16, 128, 168.0, 1024, True),
]

# ---- Phi-3: fused qkv / gate_up in its checkpoints, a sliding window on every layer ----------
_PHI3 = dict(
    model_type="phi3", vocab_size=32064, rope_theta=10000.0, rms_norm_eps=1e-5, max_position=4096,
    sliding_window=2047, bos_id=1, eos_ids=(32000, 32007), pad_id=32000,
)  # fmt: skip
PHI3 = [
    LlamaConfig(name="phi3-mini-4k", hidden_size=3072, intermediate_size=8192, num_layers=32, num_heads=32,
                num_kv_heads=32, head_dim=96, **_PHI3),
    LlamaConfig(name="phi3-medium-4k", hidden_size=5120, intermediate_size=17920, num_layers=40, num_heads=40,
                num_kv_heads=10, head_dim=128, **_PHI3),
]  # fmt: skip

PRESETS: dict[str, LlamaConfig] = {
    c.name: c
    for c in (
        SMOLLM2_135M, LLAMA2_7B, LLAMA3_1_8B, LLAMA3_2_1B, LLAMA3_2_3B, MISTRAL_7B, QWEN2_7B,
        *QWEN3, *GEMMA2, *GEMMA3, *PHI3,
    )
}  # fmt: skip


def get_preset(name: str) -> LlamaConfig:
    """Return the preset called `name` (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}") from None
