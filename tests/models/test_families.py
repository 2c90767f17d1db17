"""Model families against HF transformers: tiny random checkpoints saved by transformers
(offline), loaded by kvjax; logits within 2e-4 (relative L2) and the same greedy tokens.

Each tiny config turns on what its family does differently: Qwen3's per-head q/k norms;
Gemma 2's alternating local (window 8 < the 24-token prompt) and global layers, logit
soft-caps (small caps here so they bite), query_pre_attn_scalar != head_dim, sandwich norms,
GeGLU and sqrt(d)-scaled embeddings; Gemma 3's q/k norms and per-layer RoPE bases (a linearly
scaled global base, a plain local one), also from a multimodal checkpoint; Llama 3.2's tied
embeddings and llama3 RoPE scaling; Phi-3's fused qkv / gate_up tensors. Unsupported config
fields are errors that name the field.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_byte_tokenizer

from kvjax import generation as G
from kvjax.loaders import ModelFileError, load
from kvjax.models import forward
from kvjax.policies import Dense
from kvjax.sampling import Sampler
from kvjax.state import LayerContext

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
GEMMA = dict(
    head_dim=16, query_pre_attn_scalar=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
)
FAMILIES = {
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", dict(**GEMMA, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            **GEMMA,
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        ),
    ),
    "llama3.2": (
        "LlamaConfig",
        dict(
            tie_word_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False)),
}


def _save(directory, cls_name: str, extra: dict, scale: float = 4.0, multimodal: bool = False):
    """Save a random transformers model of `cls_name` (weights x `scale`, so attention and the
    soft-caps matter) with a byte tokenizer; return it (eager attention, float32)."""
    import torch
    import transformers

    cfg = getattr(transformers, cls_name)(**SMALL, **extra)
    if multimodal:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        cfg = transformers.Gemma3Config(text_config=cfg, vision_config={**vision, "image_size": 28, "patch_size": 14})
    torch.manual_seed(int(np.random.default_rng().integers(2**31)))
    model_cls = transformers.Gemma3ForConditionalGeneration if multimodal else transformers.AutoModelForCausalLM
    model = (model_cls._from_config if multimodal else model_cls.from_config)(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    model.eval().save_pretrained(directory, safe_serialization=True)
    write_byte_tokenizer(directory)
    return model


def _greedy(model, prompt, n):
    import jax

    first, state = G.prefill(
        model.params, jnp.asarray([prompt]), jnp.asarray([len(prompt)]), config=model.config, policy=Dense(),
        max_new_tokens=n, dtype=model.dtype,
    )  # fmt: skip
    out, _, _ = G.decode(
        model.params, state, first, jax.random.key(0), config=model.config, policy=Dense(), max_new_tokens=n,
        sampler=Sampler(), stop_ids=(), dtype=model.dtype,
    )  # fmt: skip
    return np.asarray(out[0]).tolist()


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_matches_transformers(family, tmp_path):
    import torch

    cls_name, extra = FAMILIES[family]
    hf = _save(tmp_path, cls_name, extra)
    ours = load(str(tmp_path))
    assert ours.config.model_type == family.split(".")[0].replace("llama3", "llama")
    ids = np.random.default_rng().integers(3, 256, size=24).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    got = _logits(ours, ids)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel <= 2e-4, (family, rel)
    # greedy continuation: kvjax's compiled prefill and decode loop against HF's generate
    prompt = ids[:20]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 20:]
    assert _greedy(ours, prompt, 8) == want.tolist(), family


def test_gemma3_multimodal_checkpoint_loads_its_language_model(tmp_path):
    import torch

    hf = _save(tmp_path, "Gemma3TextConfig", FAMILIES["gemma3"][1], multimodal=True)
    ours = load(str(tmp_path))
    assert ours.config.model_type == "gemma3" and ours.config.local_rope_theta == 100.0
    ids = np.random.default_rng().integers(3, 256, size=16).tolist()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = _logits(ours, ids)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) <= 2e-4


def test_local_layers_are_told_to_the_policy(tmp_path):
    """Gemma's per-layer view: the local layer's config carries the window (what a policy reads
    as ctx.config.sliding_window), the global one none; layer_window answers for init_layer."""
    _save(tmp_path, *FAMILIES["gemma3"])
    cfg = load(str(tmp_path)).config
    assert [cfg.layer_window(i) for i in range(2)] == [8, None]
    local, global_ = cfg.for_layer(0), cfg.for_layer(1)
    assert (local.sliding_window, local.rope_theta, local.rope_scaling) == (8, 100.0, None)
    assert global_.sliding_window is None and global_.rope_theta == 50000.0 and global_.rope_scaling.factor == 2.0


BAD = {
    "rope_type": (
        "LlamaConfig",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
        r"rope_scaling.rope_type='yarn' is not supported for llama: kvjax implements \('default', 'linear', 'llama3'\)",
    ),
    "partial_rotary": ("Phi3Config", {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported"),
    "bias": ("Qwen3Config", {"attention_bias": True}, r"attention_bias=True is not supported for qwen3"),
    "activation": ("LlamaConfig", {"hidden_act": "relu"}, r"hidden_act='relu' is not supported for llama"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_unsupported_config_fields_are_named(case, tmp_path):
    cls_name, extra, message = BAD[case]
    _save(tmp_path, cls_name, {"tie_word_embeddings": False})
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(extra)
    if case == "partial_rotary" and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["partial_rotary_factor"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=message):
        load(str(tmp_path))


def test_gemma_config_without_query_scalar_is_named(tmp_path):
    _save(tmp_path, *FAMILIES["gemma2"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["query_pre_attn_scalar"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"config.json lacks the field 'query_pre_attn_scalar'"):
        load(str(tmp_path))
