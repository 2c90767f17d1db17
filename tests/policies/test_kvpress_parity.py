"""Parity with kvpress 0.5.5 (HF transformers on CPU torch) on the real SmolLM2.

The whole prompt is compressed (question inside the context, as kvpress's press context
manager does during a forward pass). kvpress's kept token indices are recovered per layer and
KV head by matching the compressed cache's key vectors against the uncompressed cache's; kvjax
reports its kept positions directly. StreamingLLM is positional, so its sets must be equal.
For score-based presses the two implementations compute the same scores from keys that agree
to ~1e-6 (float32 rounding differs between torch and XLA), so a token whose score ties the k-th
best within that rounding can land on either side: we require >= 99.5% of the kept tokens to
agree and measured 99.9-100% (a handful of ties out of 9,000-18,000 kept tokens).
"""

import os

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.kvpress]

CASES = [
    # (kvpress press factory, kvjax spec, minimum agreement)
    ("StreamingLLMPress", dict(compression_ratio=0.75, n_sink=4), "streaming:budget=0.25,sink=4", 1.0),
    ("KnormPress", dict(compression_ratio=0.5), "knorm:budget=0.5", 0.995),
    (
        "SnapKVPress",
        dict(compression_ratio=0.75, window_size=32, kernel_size=5),
        "snapkv:budget=0.25,window=32,kernel=5",
        0.995,
    ),
    ("TOVAPress", dict(compression_ratio=0.75), "tova:budget=0.25", 0.995),
    (
        "PyramidKVPress",
        dict(compression_ratio=0.5, window_size=32, kernel_size=5),
        "pyramidkv:budget=0.5,window=32,kernel=5",
        0.995,
    ),
    ("ObservedAttentionPress", dict(compression_ratio=0.5), "h2o:budget=0.5,recent=0,normalize=true", 0.995),
    # 400 tokens in 20 chunks of 20: kvpress keeps 5 whole chunks, kvjax floor(0.25 * 400) = 100 slots
    (
        "ChunkKVPress",
        dict(press=("SnapKVPress", dict(compression_ratio=0.75, window_size=32, kernel_size=5)), chunk_length=20),
        "chunkkv:budget=0.25,chunk=20,window=32,kernel=5",
        0.995,
    ),
]


@pytest.fixture(scope="module")
def prompt_ids(smollm2):
    from kvjax.eval import load_text

    text = load_text("kjv-judges")
    # A fixed prompt by default, so CI is deterministic: agreement is prompt-dependent (ties at
    # the k-th score); a random prompt measured 99.3% once for SnapKV (65 of 9,000), most give
    # 99.9-100%. KVJAX_TEST_SEED=N tries another prompt.
    seed = int(os.environ.get("KVJAX_TEST_SEED", 0))
    print(f"prompt seed {seed} (replay with KVJAX_TEST_SEED={seed})")
    start = np.random.default_rng(seed).integers(0, len(text) - 4000)
    return smollm2.tokenizer.encode(text[start : start + 4000])[:400]


@pytest.fixture(scope="module")
def full_keys(hf_smollm2, prompt_ids):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        hf_smollm2(torch.tensor([prompt_ids]), past_key_values=cache)
    return [layer.keys[0].numpy() for layer in cache.layers]


def _kvpress_kept(hf, press, ids, full_keys):
    import torch
    from transformers import DynamicCache

    from kvjax.eval.kvpress_bridge import _set_impl

    cache = DynamicCache()
    impl = hf.config._attn_implementation
    if type(press).__name__ == "ChunkKVPress":  # it refuses the attention weights eager mode passes
        _set_impl(hf, "sdpa")
    try:
        with torch.no_grad(), press(hf):
            hf(torch.tensor([ids]), past_key_values=cache)
    finally:
        _set_impl(hf, impl)
    kept = []
    for i, layer in enumerate(cache.layers):
        keys = layer.keys[0].numpy()  # [N, kept, H]
        heads = []
        for n in range(keys.shape[0]):
            dist = np.abs(keys[n][:, None, :] - full_keys[i][n][None]).max(-1)
            assert np.all(dist.min(1) < 1e-4)  # every kept key is one of the prompt's keys (sdpa vs eager: ~4e-6)
            heads.append(set(dist.argmin(1).tolist()))
        kept.append(heads)
    return kept


def _kvjax_kept(model, spec, ids):
    import jax.numpy as jnp

    from kvjax.generation import prefill
    from kvjax.policies import parse_policy

    _, state = prefill(
        model.params,
        jnp.asarray([ids]),
        jnp.asarray([len(ids)]),
        config=model.config,
        policy=parse_policy(spec),
        max_new_tokens=1,
    )
    out = []
    for layer in state.layers:
        pos = np.asarray(layer.kv.pos if hasattr(layer, "kv") else layer.pos)[0]
        out.append([set(p[p >= 0].tolist()) for p in pos])
    return out


@pytest.mark.parametrize("press_name,kwargs,spec,agreement", CASES, ids=[c[0] for c in CASES])
def test_kept_indices_match_kvpress(press_name, kwargs, spec, agreement, smollm2, hf_smollm2, prompt_ids, full_keys):
    import kvpress

    kwargs = {k: getattr(kvpress, v[0])(**v[1]) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    press = getattr(kvpress, press_name)(**kwargs)
    theirs = _kvpress_kept(hf_smollm2, press, prompt_ids, full_keys)
    ours = _kvjax_kept(smollm2, spec, prompt_ids)
    assert len(ours) == len(theirs) == smollm2.config.num_layers
    total = agree = 0
    for layer_t, layer_o in zip(theirs, ours):
        for t, o in zip(layer_t, layer_o):
            assert len(t) == len(o)  # same budget per layer and head
            total += len(t)
            agree += len(t & o)
    print(f"{press_name}: {agree}/{total} kept tokens agree")
    assert agree / total >= agreement, f"{press_name}: {agree}/{total} kept tokens agree"
