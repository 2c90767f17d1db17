"""APE: adaptive parallel encoding of several contexts at shared positions.

Yang, Chen and Chen, "APE: Faster and Longer Context-Augmented Generation via Adaptive
Parallel Encoding" (ICLR 2025), arXiv:2502.05431.

    out = kvjax.ape(model, passages, "\\nQuestion: ...\\nAnswer:", prefix="Read the passages.\\n")

1. The shared prefix (P tokens) is prefilled once.
2. Every context is encoded in parallel as one row that attends to the prefix and to itself,
   all starting at position P (position reuse: k contexts of L tokens use P + L positions,
   not P + kL). The rows run on a `SharedPrefixKV` state, so the prefix is read once.
3. The contexts' slots are merged into one cache row (`rows.merge_slots`); positions ride
   along, so nothing needs a mask.
4. The query starts after the longest context (position P + max L). Its tokens and every
   generated token attend to two groups, merged through their log-sum-exps: the context
   group with attention temperature T and scale S,

       lse_ctx = T * logsumexp(q.k / (sqrt(d) T)) + log S,  out_ctx = softmax(q.k / (sqrt(d) T)) v,

   and the other group (prefix, query, generated tokens) as usual (the authors' reference
   implementation's formula). T = S = 1 is plain attention over everything (naive parallel
   encoding); the defaults T = S = 0.9 are the authors' demo values.

The dense cache only (the contexts' K/V kept in full); the query group's tokens are per row,
so several queries over the same contexts are rows of one batch.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import attention
from .generation.api import GenerateOutput
from .generation.request import check_int, check_model, check_sampler, check_stop, check_stop_ids
from .generation.resume import feed
from .generation.steps import bucket_length, decode, new_tokens_bucket, prefill
from .generation.text import cut_at_stop
from .policies import slots
from .policies.base import Policy, PolicyError
from .policies.dense import Dense
from .policies.rows import merge_slots
from .policies.shared_prefix import SharedPrefix, shared_prefix_state
from .state import KVState, LayerContext, SlotKV, bound_length, used_nbytes

DEFAULT_TEMPERATURE = 0.9
DEFAULT_SCALE = 0.9


@struct.dataclass
class APEKV:
    """prefix [1, N, P, H] and context [1, N, C, H] (the merged contexts) shared by every row;
    rows [B, N, S, H]: each row's query and generated tokens."""

    prefix: SlotKV
    context: SlotKV
    rows: SlotKV

    def nbytes_used(self) -> int:
        return used_nbytes(self.prefix) + used_nbytes(self.context) + used_nbytes(self.rows)


def check_temperature_scale(temperature, scale) -> None:
    for name, x in (("temperature", temperature), ("scale", scale)):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
            raise ValueError(f"{name}={x!r} must be a number > 0 (APE's defaults: 0.9)")


def ape_attend(q, q_pos, state: APEKV, rows: SlotKV, temperature: float, scale: float, *, window, implementation):
    """Two-group attention of q [B, T, Nq, H] (module doc): prefix and rows as usual, the
    context group at temperature T and scale S; the shared parts read once for all rows."""
    b, t, nq, h = q.shape
    qf, pf = q.reshape(1, b * t, nq, h), q_pos.reshape(1, b * t)
    kw = dict(window=window, implementation=implementation)
    pre = attention.attend(qf, state.prefix.k, state.prefix.v, pf, state.prefix.pos, **kw)
    ctx = attention.attend(
        qf, state.context.k, state.context.v, pf, state.context.pos, scale=h**-0.5 / temperature, **kw
    )
    own = attention.attend(q, rows.k, rows.v, q_pos, rows.pos, **kw)
    ctx_lse = ctx.lse * temperature + math.log(scale)
    out, lse = attention.merge_partials(
        [pre.out.reshape(b, t, nq, h), ctx.out.reshape(b, t, nq, h), own.out],
        [pre.lse.reshape(b, t, nq), ctx_lse.reshape(b, t, nq), own.lse],
    )
    return attention.AttentionOutput(out, lse)


@dataclasses.dataclass(frozen=True)
class APEAttention(Policy):
    """The query and generated tokens' step on an `APEKV` state (not a registered compression
    policy): append to the row, attend to the two groups (`ape_attend`)."""

    name = "ape"
    temperature: float = DEFAULT_TEMPERATURE
    scale: float = DEFAULT_SCALE
    appends_like_dense: ClassVar[bool] = True

    def __post_init__(self):
        check_temperature_scale(self.temperature, self.scale)

    def _step(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, APEKV):
            raise PolicyError(f"ape runs on an APEKV state (kvjax.ape builds it); got {type(state).__name__}")
        own = slots.append(state.rows, k, v, q_pos)
        res = ape_attend(
            q,
            q_pos,
            state,
            own,
            self.temperature,
            self.scale,
            window=ctx.config.sliding_window,
            implementation=ctx.implementation,
        )
        return state.replace(rows=own), res.out

    def prefill(self, state, q, k, v, q_pos, ctx):
        return self._step(state, q, k, v, q_pos, ctx)

    def decode(self, state, q, k, v, q_pos, ctx):
        return self._step(state, q, k, v, q_pos, ctx)

    def truncate_layer(self, layer, lengths):
        return layer.replace(rows=slots.truncate_slots(layer.rows, lengths))


def _ids(tok, x, name: str, allow_empty: bool = False) -> list[int]:
    if isinstance(x, str):
        ids = tok.encode(x) if x else []
    elif isinstance(x, (Sequence, np.ndarray)) and all(isinstance(i, (int, np.integer)) for i in x):
        ids = [int(i) for i in x]
    else:
        raise TypeError(f"{name}={x!r} must be a string or a list of token ids")
    if not ids and not allow_empty:
        raise ValueError(f"{name}={x!r} is empty (zero tokens)")
    return ids


def _padded(rows: list[list[int]], width: int, pad: int) -> np.ndarray:
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _timed(fn, args, static, times: dict, key: str):
    t0 = time.perf_counter()
    exe = fn.lower(*args, **static).compile()
    times["compile_s"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    res = jax.block_until_ready(exe(*args))
    times[key] += time.perf_counter() - t0
    return res


def _empty_prefix(cfg, dtype) -> KVState:
    """A one-row state with one empty slot per layer: no shared prefix."""
    layer = SlotKV.empty(1, cfg.num_kv_heads, 1, cfg.head_dim, dtype)
    return KVState(layers=(layer,) * cfg.num_layers, lengths=jnp.zeros((1,), jnp.int32))


def ape(
    model,
    contexts,
    query,
    *,
    prefix="",
    temperature: float = DEFAULT_TEMPERATURE,
    scale: float = DEFAULT_SCALE,
    max_new_tokens: int = 64,
    sampler=None,
    top_k: int | None = None,
    top_p: float | None = None,
    sampling_temperature: float | None = None,
    seed: int = 0,
    stop=None,
    stop_ids=None,
    implementation: str | None = None,
) -> GenerateOutput:
    """Answer `query` over `contexts` encoded in parallel (module doc).

    Args:
      model: a loaded model.
      contexts: a list of texts (or token-id lists), e.g. retrieved passages; each >= 1 token.
      query: the text after the contexts (or token ids); a list of them answers several
        queries as rows over the same encoded contexts.
      prefix: the shared prefix before every context ("" for none; APE recommends one, e.g.
        the instruction or the chat template's opening).
      temperature, scale: APE's T and S for the context group (> 0; 1 and 1: naive parallel
        encoding).
      max_new_tokens, sampler / sampling_temperature / top_k / top_p, seed, stop, stop_ids:
        as in `kvjax.generate` (`sampling_temperature` is generate's `temperature`).
      implementation: the attention implementation.

    Positions: prefix + the longest context + the query + max_new_tokens must fit the model's
    max_position (the contexts together may be far longer). Returns a `GenerateOutput`
    (texts, tokens, n_tokens, the APE state, stats: prefix_tokens, context_tokens (all
    contexts), query_tokens, prefill_tokens, positions_used, prefill_s, decode_s,
    compile_s, generated_tokens, kv_bytes_held, ...)."""
    check_model(model)
    check_temperature_scale(temperature, scale)
    n_new = check_int("max_new_tokens", max_new_tokens, 1)
    smp = check_sampler(sampler, sampling_temperature, top_k, top_p)
    stop, stop_ids = check_stop(stop), check_stop_ids(stop_ids)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
    cfg, tok = model.config, model.tokenizer
    if isinstance(contexts, str) or not isinstance(contexts, Sequence) or len(contexts) == 0:
        raise TypeError(f"contexts={contexts!r} must be a non-empty list of texts (or token-id lists)")
    ctx_ids = [_ids(tok, c, f"contexts[{i}]") for i, c in enumerate(contexts)]
    pre_ids = _ids(tok, prefix, "prefix", allow_empty=True)
    queries = [query] if isinstance(query, str) or (query and isinstance(query[0], (int, np.integer))) else query
    if not isinstance(queries, Sequence) or len(queries) == 0:
        raise TypeError(f"query={query!r} must be a text, token ids, or a non-empty list of them")
    q_ids = [_ids(tok, q, f"query[{i}]" if len(queries) > 1 else "query") for i, q in enumerate(queries)]
    p, longest, lq = len(pre_ids), max(len(c) for c in ctx_ids), max(len(q) for q in q_ids)
    if p + longest + lq + n_new > cfg.max_position:
        raise ValueError(
            f"prefix ({p}) + the longest context ({longest}) + query ({lq}) + max_new_tokens={n_new} = "
            f"{p + longest + lq + n_new} positions exceed the model's max_position={cfg.max_position}; split the "
            "longest context into shorter passages"
        )
    times = dict(prefill_s=0.0, decode_s=0.0, compile_s=0.0)
    common = dict(config=cfg, dtype=model.dtype, implementation=implementation)
    if p:
        width = bucket_length(p)
        args = (model.params, jnp.asarray(_padded([pre_ids], width, cfg.pad_id)), jnp.asarray([p], jnp.int32))
        static = dict(policy=Dense(), max_new_tokens=0, longest=bound_length(p, width), **common)
        _, pre = _timed(prefill, args, static, times, "prefill_s")
    else:
        pre = _empty_prefix(cfg, model.dtype)
    # the contexts as rows over the shared prefix, all from position p
    k = len(ctx_ids)
    cw = bucket_length(longest, minimum=16)
    state = shared_prefix_state(pre, k, cw)
    lens = np.asarray([len(c) for c in ctx_ids], np.int32)
    cols = np.arange(cw)[None]
    pos = np.where(cols < lens[:, None], p + cols, -1).astype(np.int32)
    args = (model.params, state, jnp.asarray(_padded(ctx_ids, cw, cfg.pad_id)), jnp.asarray(pos), jnp.asarray(lens - 1))
    _, state = _timed(
        feed, args, dict(policy=SharedPrefix(), phase="prefill", chunked=True, **common), times, "prefill_s"
    )
    # merged contexts + per-query rows; the query starts after the longest context
    b, bucket = len(q_ids), new_tokens_bucket(n_new)
    qw = bucket_length(lq, minimum=16)
    layers = tuple(
        APEKV(
            prefix=layer.prefix,
            context=merge_slots(layer.rows),
            rows=SlotKV.empty(b, cfg.num_kv_heads, qw + bucket, cfg.head_dim, layer.rows.k.dtype),
        )
        for layer in state.layers
    )
    start = p + longest
    state = KVState(layers=layers, lengths=jnp.full((b,), start, jnp.int32))
    policy = APEAttention(float(temperature), float(scale))
    qlens = np.asarray([len(q) for q in q_ids], np.int32)
    cols = np.arange(qw)[None]
    pos = np.where(cols < qlens[:, None], start + cols, -1).astype(np.int32)
    args = (model.params, state, jnp.asarray(_padded(q_ids, qw, cfg.pad_id)), jnp.asarray(pos), jnp.asarray(qlens - 1))
    logits, state = _timed(feed, args, dict(policy=policy, phase="prefill", chunked=True, **common), times, "prefill_s")
    stops = stop_ids if stop_ids is not None else tuple(tok.eos_ids)
    args = (model.params, state, logits, jax.random.key(int(seed)), jnp.int32(n_new))
    static = dict(policy=policy, max_new_tokens=bucket, sampler=smp, stop_ids=stops, **common)
    del state  # donated to decode
    out, n_out, state = _timed(decode, args, static, times, "decode_s")
    out, n_out = np.array(out)[:, :n_new], np.array(n_out)
    texts = []
    for r in range(b):
        if stop:
            text, n = cut_at_stop(tok, out[r, : n_out[r]].tolist(), stop)
            out[r, n:] = cfg.pad_id
            n_out[r] = n
        else:
            text = tok.decode(out[r, : n_out[r]])
        texts.append(text)
    stats = {
        "prefix_tokens": p,
        "contexts": k,
        "context_tokens": int(lens.sum()),
        "query_tokens": int(qlens.sum()),
        "prefill_tokens": p + int(lens.sum()) + int(qlens.sum()),
        "positions_used": start + lq + n_new,
        "generated_tokens": int(n_out.sum()),
        "temperature": float(temperature),
        "scale": float(scale),
        **times,
        **state.byte_stats(cfg),
    }
    # Every row saw the prefix, all contexts, its query and its answer (more tokens than the
    # positions its `lengths` count, under position reuse).
    seen = b * (p + int(lens.sum())) + int(qlens.sum()) + int(n_out.sum())
    stats["dense_bytes_of_seen"] = seen * cfg.kv_bytes_per_token(jnp.dtype(layers[0].rows.k.dtype).itemsize)
    return GenerateOutput(texts, out, n_out, state, stats)


__all__ = ["APEKV", "APEAttention", "ape", "ape_attend"]
