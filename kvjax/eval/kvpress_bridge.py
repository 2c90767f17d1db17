"""The same sessions through HF transformers + kvpress (CPU torch), for side-by-side tables.

`press_for(spec)` maps a kvjax spec to the kvpress press of the same method (kvpress's
`compression_ratio` is the fraction REMOVED, kvjax's `budget` the fraction KEPT):

    streaming:budget=b,sink=s        StreamingLLMPress(1-b, n_sink=s)
    snapkv:budget=b,window=w,kernel=k SnapKVPress(1-b, window_size=w, kernel_size=k)
    pyramidkv:...                     PyramidKVPress(1-b, window_size=w, kernel_size=k, beta)
    tova:budget=b,on_decode=false     TOVAPress(1-b)  (kvpress does not evict while decoding)
    knorm:budget=b                    KnormPress(1-b)
    h2o:budget=b,recent=0,normalize=true  ObservedAttentionPress(1-b)
    adakv:budget=b,...                AdaKVPress(SnapKVPress(1-b, w, k), alpha_safeguard)
    chunkkv:budget=b,chunk=c,scorer=s ChunkKVPress(<s's press>(1-b), chunk_length=c)  (without weights)
    dense                             no press (HF's full cache)

`run_press_sessions` runs one prefill per row for all presses at once: a forward hook on
every attention layer hands the layer's full keys/values, hidden states and attention
weights to each press's own `compress` (exactly what kvpress's `forward_hook` does, which
then overwrites the cache) and keeps each press's result in its own cache. The hidden
states are the same for every press because kvpress, like kvjax, compresses a layer only
after its attention output is computed; tests check the kept keys equal kvpress's own
context manager's. Each press's cache then answers the turns as `kvjax.eval.session` does
(question appended with absolute `position_ids`, greedy answer, gold answer kept).
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..policies.registry import parse_policy
from .session import MODES, SessionResult, prefill_ids


def press_recipe(spec: str):
    """(press class name, keyword arguments) of the kvpress press equivalent to kvjax `spec`,
    a nested press given as such a pair; None for dense. ValueError when kvpress has none.
    Needs no kvpress import, so a sweep checks its kvpress cells before loading anything."""
    pol = parse_policy(spec)
    name = pol.name
    if name == "dense":
        return None
    ratio = 1.0 - getattr(pol, "budget", 1.0)
    if name == "streaming":
        return "StreamingLLMPress", dict(compression_ratio=ratio, n_sink=pol.sink)
    if name in ("snapkv", "adakv"):
        snap = ("SnapKVPress", dict(compression_ratio=ratio, window_size=pol.window, kernel_size=pol.kernel))
        return snap if name == "snapkv" else ("AdaKVPress", dict(press=snap, alpha_safeguard=pol.safeguard))
    if name == "pyramidkv":
        return "PyramidKVPress", dict(
            compression_ratio=ratio, window_size=pol.window, kernel_size=pol.kernel, beta=pol.beta
        )
    if name == "tova" and not pol.on_decode:
        return "TOVAPress", dict(compression_ratio=ratio)
    if name == "knorm":
        return "KnormPress", dict(compression_ratio=ratio)
    if name == "h2o" and pol.recent == 0 and pol.normalize:
        return "ObservedAttentionPress", dict(compression_ratio=ratio)
    if name == "chunkkv" and pol.scorer in ("snapkv", "tova", "knorm"):
        scorer = {
            "snapkv": ("SnapKVPress", dict(compression_ratio=ratio, window_size=pol.window, kernel_size=pol.kernel)),
            "tova": ("TOVAPress", dict(compression_ratio=ratio)),
            "knorm": ("KnormPress", dict(compression_ratio=ratio)),
        }[pol.scorer]
        return "ChunkKVPress", dict(press=scorer, chunk_length=pol.chunk)
    raise ValueError(
        f"no kvpress press matches {spec!r}; kvpress columns exist for dense, streaming, snapkv, "
        "pyramidkv, adakv, knorm, chunkkv, tova with on_decode=false and h2o with recent=0,normalize=true"
    )


def check_kvpress(specs) -> None:
    """Raise ValueError when kvpress is not installed or one of `specs` has no kvpress press."""
    import importlib.util

    if importlib.util.find_spec("kvpress") is None:
        raise ValueError("engine 'kvpress' needs the kvpress package (pip install kvpress==0.5.5)")
    for s in specs:
        press_recipe(s)


def press_for(spec: str):
    """The kvpress press equivalent to kvjax `spec` (None for dense); ValueError otherwise."""
    import kvpress

    def build(recipe):
        cls, kwargs = recipe
        return getattr(kvpress, cls)(**{k: build(v) if isinstance(v, tuple) else v for k, v in kwargs.items()})

    recipe = press_recipe(spec)
    return None if recipe is None else build(recipe)


def load_hf(model: str = "smollm2"):
    """HF transformers model (float32, eager attention so ObservedAttention sees weights).
    Loading is quiet: transformers' logging at error level, and its progress bars (GGUF
    de-quantization, weight loading) go nowhere."""
    import contextlib
    import io

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch
    import transformers

    from ..loaders.load import EMBEDDED, embedded_path

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = embedded_path(model) if model in EMBEDDED else model
    kw = dict(dtype=torch.float32, attn_implementation="eager")
    # transformers' GGUF reader draws a plain tqdm bar on stderr that no setting turns off
    with contextlib.redirect_stderr(io.StringIO()):
        if path.endswith(".gguf"):
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), **kw
            )
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, **kw)
    return hf.eval()


def _set_impl(hf, impl: str) -> None:
    hf.config._attn_implementation = impl
    for layer in hf.model.layers:
        layer.self_attn.config._attn_implementation = impl


def _prefill_all(hf, ids, presses):
    """One eager prefill; returns (last logits, [per press: (keys, values, masked) per layer])."""
    import torch
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    for p in presses:
        if p is not None:
            p.post_init_from_model(hf)
    kept = [[None] * len(hf.model.layers) for _ in presses]

    def hook(module, args, kwargs, output):
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for i, p in enumerate(presses):
            module.masked_key_indices = None
            if p is None:
                kept[i][module.layer_idx] = (keys, values, None)
                continue
            adakv = type(p).__name__ == "AdaKVPress"
            if adakv:  # its eager-mode guard protects decoding, which runs under sdpa here
                module.config._attn_implementation = "sdpa"
            weights = None if type(p).__name__ == "ChunkKVPress" else output[1]  # it refuses them
            k, v = p.compress(module, kwargs["hidden_states"], keys, values, weights, kwargs)
            if adakv:
                module.config._attn_implementation = "eager"
            kept[i][module.layer_idx] = (k, v, getattr(module, "masked_key_indices", None))
        module.masked_key_indices = None
        return output

    _set_impl(hf, "eager")
    hooks = [layer.self_attn.register_forward_hook(hook, with_kwargs=True) for layer in hf.model.layers]
    try:
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([ids]), past_key_values=DynamicCache(), logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return out.logits[0, -1], kept


def _answer(hf, cache, logits, pos: int, n: int, eos) -> list[int]:
    import torch

    lengths = [layer.keys.shape[2] for layer in cache.layers]
    toks = [int(logits.argmax())]
    with torch.no_grad():
        for i in range(n - 1):
            if toks[-1] in eos:
                break
            out = hf(
                input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, position_ids=torch.tensor([[pos + i]])
            )
            toks.append(int(out.logits[0, -1].argmax()))
    for layer, n_keep in zip(cache.layers, lengths):  # drop the answer (kvpress's pipeline does too)
        layer.keys, layer.values = layer.keys[:, :, :n_keep], layer.values[:, :, :n_keep]
    return toks


def _session(hf, tokenizer, layers, logits, ids_len, pieces, mode, answer_tokens):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v, _) in enumerate(layers):
        cache.update(k.clone(), v.clone(), i)
    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.masked_key_indices = layers[i][2]
    pos, outputs = ids_len, []
    eos = set(tokenizer.eos_ids)
    for t, piece in enumerate(pieces):
        if t > 0 or mode == "excluded":
            with torch.no_grad():
                out = hf(
                    input_ids=torch.tensor([piece]),
                    past_key_values=cache,
                    position_ids=torch.arange(pos, pos + len(piece))[None],
                    logits_to_keep=1,
                )
            logits, pos = out.logits[0, -1], pos + len(piece)
        toks = _answer(hf, cache, logits, pos, answer_tokens, eos)
        outputs.append(tokenizer.decode([x for x in toks if x not in eos]))
    return outputs


def run_press_sessions(hf, tokenizer, specs, contexts, turns, mode: str = "inside", answer_tokens: int = 8):
    """{spec: SessionResult or Exception} for every spec (see module doc), one row at a time."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    presses, results = {}, {}
    for s in specs:
        try:
            presses[s] = press_for(s)
        except Exception as e:  # recorded per cell by the sweep
            results[s] = e
    names = list(presses)
    acc = {s: {"outputs": [], "kv": [], "dense": [], "pre": 0.0, "dec": 0.0} for s in names}
    for ids, pieces in zip(prefill_ids(contexts, turns, mode), turns):
        t0 = time.perf_counter()
        logits, kept = _prefill_all(hf, ids, [presses[s] for s in names])
        shared = time.perf_counter() - t0
        _set_impl(hf, "sdpa")
        for s, layers in zip(names, kept):
            a = acc[s]
            a["pre"] += shared
            a["kv"].append(sum(k.nbytes + v.nbytes for k, v, _ in layers))
            a["dense"].append(sum(2 * k.shape[1] * len(ids) * k.shape[3] * k.element_size() for k, _, _ in layers))
            t1 = time.perf_counter()
            try:
                a["outputs"].append(_session(hf, tokenizer, layers, logits, len(ids), pieces, mode, answer_tokens))
            except Exception as e:
                results[s] = e
            a["dec"] += time.perf_counter() - t1
        for layer in hf.model.layers:
            layer.self_attn.masked_key_indices = None
    for s in names:
        if s not in results:
            a = acc[s]
            results[s] = SessionResult(
                a["outputs"], float(np.mean(a["kv"])), float(np.mean(a["dense"])), a["pre"], 0.0, 0.0, a["dec"]
            )
    return results
