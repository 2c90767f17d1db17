"""kvpress side of the harness: spec -> press mapping, and the one-prefill-for-all-presses
replay equals each press's own context manager on the real SmolLM2 (HF, CPU torch)."""

import numpy as np
import pytest

from kvjax.eval.kvpress_bridge import press_for

SPECS = [
    "streaming:budget=0.5",
    "snapkv:budget=0.5,window=16",
    "pyramidkv:budget=0.5,window=16",
    "tova:budget=0.5,on_decode=false",
    "knorm:budget=0.5",
    "h2o:budget=0.5,recent=0,normalize=true",
    "adakv:budget=0.5,window=16",
    "chunkkv:budget=0.5,chunk=10,window=16",
]


@pytest.mark.kvpress
def test_press_mapping():
    p = press_for("snapkv:budget=0.2,window=32,kernel=7")
    assert type(p).__name__ == "SnapKVPress" and p.compression_ratio == pytest.approx(0.8)
    assert (p.window_size, p.kernel_size) == (32, 7)
    assert press_for("dense") is None
    assert press_for("adakv:budget=0.1").press.compression_ratio == pytest.approx(0.9)
    assert type(press_for("tova:budget=0.3,on_decode=false")).__name__ == "TOVAPress"
    c = press_for("chunkkv:budget=0.2,chunk=16,scorer=tova")
    assert (type(c).__name__, type(c.press).__name__, c.chunk_length) == ("ChunkKVPress", "TOVAPress", 16)
    assert c.compression_ratio == pytest.approx(0.8)
    for spec in ("h2o:budget=0.5", "tova:budget=0.5"):  # both evict while decoding; kvpress does not
        with pytest.raises(ValueError, match=f"no kvpress press matches '{spec}'"):
            press_for(spec)


@pytest.mark.slow
@pytest.mark.kvpress
def test_replay_equals_each_press(hf_smollm2, smollm2):
    import torch
    from transformers import DynamicCache

    from kvjax.eval import kvpress_bridge as kb
    from kvjax.eval import load_text

    ids = smollm2.tokenizer.encode(load_text("kjv-judges")[5000:7000])[:300]
    presses = [press_for(s) for s in SPECS]
    _, kept = kb._prefill_all(hf_smollm2, ids, presses)
    for spec, press, layers in zip(SPECS, presses, kept):
        cache = DynamicCache()
        kb._set_impl(hf_smollm2, "sdpa" if spec.startswith(("adakv", "chunkkv")) else "eager")
        with torch.no_grad(), press(hf_smollm2):
            hf_smollm2.model(input_ids=torch.tensor([ids]), past_key_values=cache)
        for i, layer in enumerate(cache.layers):
            k, v, masked = layers[i]
            np.testing.assert_allclose(k.numpy(), layer.keys.numpy(), atol=1e-4, err_msg=spec)
            np.testing.assert_allclose(v.numpy(), layer.values.numpy(), atol=1e-4, err_msg=spec)
            theirs = getattr(hf_smollm2.model.layers[i].self_attn, "masked_key_indices", None)
            if spec.startswith("adakv"):
                assert masked is not None and theirs is not None
                assert set(zip(*[m.tolist() for m in masked])) == set(zip(*[m.tolist() for m in theirs]))
        for layer in hf_smollm2.model.layers:
            layer.self_attn.masked_key_indices = None
    kb._set_impl(hf_smollm2, "eager")


@pytest.mark.slow
@pytest.mark.kvpress
def test_press_sessions_answer_passkey(hf_smollm2, smollm2):
    """Full cache and a mild press find a passkey at 512 tokens, question inside or excluded."""
    from kvjax.eval import kvpress_bridge as kb
    from kvjax.eval import load_text
    from kvjax.eval.tasks import passkey

    tok = smollm2.tokenizer
    ep = passkey(tok, 512, 0.3, 5, load_text("kjv-judges"))
    ctx, turns = [tok.encode(ep.context)], [[tok.encode(p) for p in ep.pieces()]]
    for mode in ("inside", "excluded"):
        res = kb.run_press_sessions(hf_smollm2, tok, ["dense", "knorm:budget=0.9"], ctx, turns, mode)
        for spec in ("dense", "knorm:budget=0.9"):
            assert ep.turns[0].answer in res[spec].outputs[0][0], (mode, spec, res[spec].outputs)
        assert res["knorm:budget=0.9"].kv_bytes < 0.95 * res["dense"].kv_bytes
    kb._set_impl(hf_smollm2, "eager")


@pytest.mark.slow
@pytest.mark.kvpress
def test_loading_the_hf_model_is_quiet(capfd):
    """The kvpress engine's model loads without progress bars or log lines (transformers' GGUF
    de-quantization bar included)."""
    from kvjax.eval.kvpress_bridge import load_hf

    hf = load_hf("smollm2")
    out, err = capfd.readouterr()
    assert hf.config.num_hidden_layers == 30
    assert out == "" and err == "", err[-400:]
