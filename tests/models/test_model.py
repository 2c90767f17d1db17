"""The functional Llama: presets, RoPE scaling, incremental decoding, HF parity."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.models import PRESETS, forward, fuse_projections, get_preset, init_params, unfuse_projections
from kvjax.models.rope import apply_rope, inverse_frequencies, invert_rope
from kvjax.policies import Dense
from kvjax.state import LayerContext

# Published parameter counts (embeddings counted once when tied).
EXPECTED_PARAMS = {
    "smollm2-135m": 134.5e6,
    "llama3.1-8b": 8.03e9,
    "mistral-7b": 7.25e9,
    "qwen2-7b": 7.62e9,
    "llama2-7b": 6.74e9,
    "llama3.2-1b": 1.24e9,
    "llama3.2-3b": 3.21e9,
    "qwen3-0.6b": 0.596e9,
    "qwen3-1.7b": 1.72e9,
    "qwen3-4b": 4.02e9,
    "qwen3-8b": 8.19e9,
    "qwen3-14b": 14.8e9,
    "qwen3-32b": 32.8e9,
    "gemma2-2b": 2.61e9,
    "gemma2-9b": 9.24e9,
    "gemma2-27b": 27.2e9,
    # Gemma 3's language models (the 4b/12b/27b checkpoints add a ~0.4B vision tower)
    "gemma3-1b": 1.0e9,
    "gemma3-4b": 3.88e9,
    "gemma3-12b": 11.77e9,
    "gemma3-27b": 27.0e9,
    "phi3-mini-4k": 3.82e9,
    "phi3-medium-4k": 14.0e9,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_eval_shape(name):
    cfg = get_preset(name)
    shapes = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == cfg.num_params()
    assert abs(n - EXPECTED_PARAMS[name]) / EXPECTED_PARAMS[name] < 0.01
    emb = shapes["params"]["embed_tokens"]["embedding"]
    assert emb.shape == (cfg.vocab_size, cfg.hidden_size) and emb.dtype == jnp.bfloat16
    assert ("lm_head" in shapes["params"]) == (not cfg.tie_embeddings)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset 'llama9'"):
        get_preset("llama9")


def test_bad_config():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        dataclasses.replace(get_preset("smollm2-135m"), num_heads=6, num_kv_heads=4)


def test_llama3_rope_scaling_matches_transformers():
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = get_preset("llama3.1-8b")
    hf = HFConfig(
        hidden_size=4096,
        num_attention_heads=32,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    np.testing.assert_allclose(inverse_frequencies(128, cfg.rope_theta, cfg.rope_scaling), inv.numpy(), rtol=1e-6)


def test_invert_rope_is_exact(tiny_config, rng):
    x = jnp.asarray(rng.normal(size=(2, 5, 3, tiny_config.head_dim)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 400, size=(2, 5)))
    np.testing.assert_allclose(invert_rope(apply_rope(x, pos, tiny_config), pos, tiny_config), x, atol=1e-5)


def _full_and_incremental(params, cfg, tokens, lengths):
    b, t = tokens.shape
    pos = jnp.where(jnp.arange(t)[None] < lengths[:, None], jnp.arange(t)[None], -1)
    state = Dense().init_state(cfg, b, t, 0, jnp.float32)
    full, _ = forward(params, tokens, pos, state, config=cfg, policy=Dense(), ctx=LayerContext(0, cfg, prompt_len=t))
    # Prefill the first 3 tokens, then feed the rest one token per step.
    p0 = 3
    state = Dense().init_state(cfg, b, p0, t - p0, jnp.float32)
    _, state = forward(
        params,
        tokens[:, :p0],
        pos[:, :p0],
        state,
        config=cfg,
        policy=Dense(),
        ctx=LayerContext(0, cfg, prompt_len=p0, max_new_tokens=t - p0),
    )
    step = jax.jit(
        lambda s, tok, p: forward(
            params, tok, p, s, config=cfg, policy=Dense(), ctx=LayerContext(0, cfg, phase="decode")
        )
    )
    outs = []
    for i in range(p0, t):
        logits, state = step(state, tokens[:, i : i + 1], pos[:, i : i + 1])
        outs.append(logits[:, 0])
    return full, jnp.stack(outs, axis=1), p0


def test_incremental_decoding_equals_full_forward_ragged(tiny_config, tiny_params, rng):
    b, t = 3, 12
    tokens = jnp.asarray(rng.integers(3, tiny_config.vocab_size, size=(b, t)), jnp.int32)
    lengths = jnp.asarray([12, 7, 9])
    full, inc, p0 = _full_and_incremental(tiny_params, tiny_config, tokens, lengths)
    for r in range(b):
        n = int(lengths[r])
        np.testing.assert_allclose(inc[r, : n - p0], full[r, p0:n], rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("qkv_bias, groups", [(False, 1), (True, 1), (True, 2)])
def test_fused_projections_compute_the_same_model(tiny_config, rng, qkv_bias, groups):
    """fuse_projections concatenates q/k/v and gate/up (in `groups` groups of whole heads, one per
    tensor-parallel shard); logits stay those of the separate weights, and unfusing restores them."""
    cfg = dataclasses.replace(tiny_config, qkv_bias=qkv_bias)
    params = jax.tree_util.tree_map(lambda x: x + 0.1 * jnp.ones_like(x), init_params(cfg, jax.random.key(1)))
    fused, fcfg = fuse_projections(params, cfg, groups=groups)
    assert fcfg.fused_groups == groups
    back, bcfg = unfuse_projections(fused, fcfg)
    assert bcfg == cfg and jax.tree.all(jax.tree.map(jnp.array_equal, back, params))
    attn = fused["params"]["layers_0"]["self_attn"]
    assert fcfg.fused_projections and set(attn) == {"qkv_proj", "o_proj"}
    assert set(fused["params"]["layers_0"]["mlp"]) == {"gate_up_proj", "down_proj"}
    assert ("bias" in attn["qkv_proj"]) == qkv_bias
    assert fuse_projections(fused, fcfg, groups=groups)[0] is fused  # already fused so: unchanged
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, size=(2, 9)), jnp.int32)
    lengths = jnp.asarray([9, 6])
    a, inc_a, _ = _full_and_incremental(params, cfg, tokens, lengths)
    b, inc_b, _ = _full_and_incremental(fused, fcfg, tokens, lengths)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inc_b, inc_a, rtol=1e-5, atol=1e-5)
    broken = {"params": {**params["params"], "layers_1": {**params["params"]["layers_1"], "mlp": {}}}}
    with pytest.raises(ValueError, match=r"layers_1.mlp lacks \['gate_proj', 'up_proj'\]"):
        fuse_projections(broken, cfg)


@pytest.mark.slow
def test_logits_match_hf_transformers(smollm2, hf_smollm2):
    import torch

    from kvjax.eval import load_text

    ids = smollm2.tokenizer.encode(load_text("pydoc")[5000:6500])[:128]
    assert len(ids) >= 64
    state = Dense().init_state(smollm2.config, 1, len(ids), 0, jnp.float32)
    logits, _ = jax.jit(
        lambda p, x, s: forward(
            p,
            x,
            jnp.arange(len(ids))[None],
            s,
            config=smollm2.config,
            policy=Dense(),
            ctx=LayerContext(0, smollm2.config, prompt_len=len(ids)),
        )
    )(smollm2.params, jnp.asarray([ids]), state)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits.numpy()
    rel = np.linalg.norm(np.asarray(logits) - ref) / np.linalg.norm(ref)
    assert rel <= 1e-4, rel


@pytest.mark.slow
def test_greedy_continuation_matches_hf(smollm2, hf_smollm2):
    import torch

    from kvjax.generation import generate

    prompt = "The history of the city of Rome begins"
    out = generate(smollm2, prompt, max_new_tokens=32, stop_ids=())
    ids = smollm2.tokenizer.encode(prompt)
    with torch.no_grad():
        ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, min_new_tokens=32)
    assert out.tokens[0].tolist() == ref[0, len(ids) :].tolist()
