"""`generate` and `stream`: text in, text out, through the compiled prefill and decode steps.

Prompt lengths and `max_new_tokens` are bucketed to powers of two (`bucket_length`,
`new_tokens_bucket`), so a new prompt of a similar length, or one more or one fewer new
token, reuses the compiled programs; crossing a power of two compiles new ones. Each program
is compiled ahead of its call (`jit(...).lower(...).compile()`, a cache lookup when jax has
it already), so the stats report compile time apart from run time.

Streaming keeps the decode loop compiled: `decode_start` samples the first token, then a host
loop calls `decode_steps` (the same `lax.while_loop` body as `decode`, with a traced bound)
`chunk_steps` tokens at a time, reads the new tokens and hands out their text. Tokens are the
ones `decode` produces; the cost is one host round trip per chunk.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ..policies.base import Policy
from ..sampling import Sampler
from ..state import KVState, bound_length
from .prefix import DEFAULT_MIN_PREFIX, generate_shared
from .request import Request, build_request, check_int, check_options
from .steps import decode, decode_start, decode_steps, prefill
from .text import RowText


@dataclasses.dataclass
class GenerateOutput:
    """texts: the continuations (cut before a stop string); tokens [B, max_new_tokens] int32
    (pad_id after a row stops); n_tokens [B]: tokens each row produced (a stop token, or the
    token completing a stop string, included); state: the final KVState; stats: see
    `generate`."""

    texts: list[str]
    tokens: np.ndarray
    n_tokens: np.ndarray
    state: KVState
    stats: dict


class StreamPiece(NamedTuple):
    """One generated token: its batch row, its id, and the text it makes printable ("" while
    held back: the start of a multi-byte character or of a possible stop string)."""

    row: int
    token_id: int
    text: str


def _compiled(fn, args: tuple, static: dict):
    """(executable of jitted `fn` for these arguments, seconds spent tracing and compiling)."""
    t0 = time.perf_counter()
    exe = fn.lower(*args, **static).compile()
    return exe, time.perf_counter() - t0


def _stats(req: Request, model, state: KVState, kv_after_prefill: int, n_tokens, times: dict) -> dict:
    """The stats dict of a finished call (the one place it is built)."""
    prompt_tokens = sum(len(t) for t in req.ids)
    generated = int(np.sum(n_tokens))
    rows = len(req.ids)
    return {
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "prefill_s": times["prefill_s"],
        "decode_s": times["decode_s"],
        "compile_s": times["prefill_compile_s"] + times["decode_compile_s"],
        "prefill_compile_s": times["prefill_compile_s"],
        "decode_compile_s": times["decode_compile_s"],
        "prefill_tokens_per_s": prompt_tokens / max(times["prefill_s"], 1e-9),
        # the first token of each row comes from the prefill logits
        "decode_tokens_per_s": max(generated - rows, 0) / max(times["decode_s"], 1e-9),
        "kv_bytes": state.nbytes,
        "kv_bytes_after_prefill": kv_after_prefill,
        "dense_kv_bytes": state.dense_nbytes(model.config),
        **state.byte_stats(model.config),  # held / used / headroom / read per step / dense of seen (KVState doc)
        "policy": req.options.policy.spec(),
        "prompt_bucket": req.width,
        "new_tokens_bucket": req.options.new_tokens_bucket,
    }


class _Call:
    """One generation call: the request, prefill, then a decode (whole, or chunk by chunk)."""

    def __init__(self, model, req: Request, implementation: str | None):
        self.model, self.req, self.implementation = model, req, implementation
        opts = req.options
        cfg = model.config
        tokens = np.full((len(req.ids), req.width), cfg.pad_id, np.int32)
        for i, t in enumerate(req.ids):
            tokens[i, : len(t)] = t
        self.lengths = jnp.asarray([len(t) for t in req.ids], jnp.int32)
        self.tokens = jnp.asarray(tokens)
        self.common = dict(config=cfg, policy=opts.policy, dtype=model.dtype, implementation=implementation)
        self.times = {"prefill_s": 0.0, "decode_s": 0.0, "prefill_compile_s": 0.0, "decode_compile_s": 0.0}
        self.pp: dict = {}  # {"policy_params": pytree} when `generate` was given traced policy parameters

    def prefill(self):
        opts = self.req.options
        args = (self.model.params, self.tokens, self.lengths)
        static = dict(max_new_tokens=opts.new_tokens_bucket, prefill_chunk=opts.prefill_chunk, **self.common)
        static["longest"] = bound_length(max(len(t) for t in self.req.ids), self.req.width)
        exe, self.times["prefill_compile_s"] = _compiled(prefill, args, {**static, **self.pp})
        t0 = time.perf_counter()
        logits, state = jax.block_until_ready(exe(*args, **self.pp))
        self.times["prefill_s"] = time.perf_counter() - t0
        self.kv_after_prefill = state.nbytes
        return logits, state

    def decode_static(self) -> dict:
        opts = self.req.options
        return dict(
            max_new_tokens=opts.new_tokens_bucket, sampler=opts.sampler, stop_ids=self.req.stop_ids, **self.common
        )

    def finish(self, out: np.ndarray, n_out: np.ndarray, state: KVState, texts: list[str]) -> GenerateOutput:
        stats = _stats(self.req, self.model, state, self.kv_after_prefill, n_out, self.times)
        return GenerateOutput(texts, out, n_out, state, stats)


def _prepare(model, prompts, messages, implementation, **kw) -> _Call:
    return _Call(model, build_request(model, prompts, messages, options=check_options(**kw)), implementation)


def generate(
    model,
    prompts: str | Sequence[str] | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]] | None = None,
    policy: Policy | str = "dense",
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    sampler: Sampler | None = None,
    seed: int = 0,
    stop: str | Sequence[str] | None = None,
    stop_ids: Sequence[int] | None = None,
    chat: bool = False,
    on_token: Callable[[int, int, str], object] | None = None,
    prefill_chunk: int | None = None,
    implementation: str | None = None,
    share_prefixes: bool | int = False,
    speculative=None,
    draft_model=None,
    policy_params=None,
) -> GenerateOutput:
    """Generate continuations for one prompt or a batch of prompts of any lengths.

    Args:
      model: a loaded model (`kvjax.load("smollm2")`, a .gguf file or an HF directory).
      prompts: a string or a list of strings (one row each). Give `prompts` or `messages`.
      messages: chat messages rendered with the model's chat template: one conversation
        `[{"role": "user", "content": "..."}]` or a list of conversations (a batch). Roles:
        system, user, assistant, tool; contents are strings.
      policy: the KV-cache policy, a `Policy` or a spec string ("snapkv:budget=0.2",
        "snapkv:budget=0.2+kivi:bits=2"; `kvjax policies` lists them).
      max_new_tokens: most tokens to generate per row (>= 1). Buckets of powers of two
        (16, 32, 64, ...) share one compiled program.
      temperature: 0 (the default) decodes greedily; > 0 samples from softmax(logits / T).
      top_k: sample among the k most likely tokens (0 = all); needs temperature > 0.
      top_p: sample from the smallest set of tokens whose probability reaches p (1 = all);
        needs temperature > 0.
      sampler: a `kvjax.sampling.Sampler` instead of temperature / top_k / top_p (not both).
      seed: the PRNG seed of sampling (an integer in [0, 2**32)).
      stop: a string or a list of strings: a row stops at the first one it generates; the
        text is cut before it.
      stop_ids: token ids that stop a row (default: the tokenizer's end-of-sequence ids;
        `[]` for none). The stop token is counted in `n_tokens`, and not shown in the text.
      chat: wrap each prompt as one user message in the chat template.
      on_token: `on_token(row, token_id, text)` is called for every generated token, in
        order, as the tokens are produced (see `stream`); None: decode in one call.
      prefill_chunk: prefill the prompt in chunks of this many tokens (>= 1; None: at once).
      implementation: the attention implementation (None: the backend's default).
      share_prefixes: BatchLLM global prefix sharing (`kvjax.generation.prefix`): rows are
        grouped by shared prefixes chosen to maximise the reused prompt tokens, each prefix
        is prefilled once and read once per decode step for its group, and results come back
        in the caller's order (greedy: the same tokens). True shares prefixes of at least 16
        tokens, an integer sets that minimum. Dense cache only; not with on_token or
        prefill_chunk. Stats add prefill_tokens, prefill_tokens_saved and prefix_groups;
        `state` is None when the batch ran as several groups.
      speculative: lossless speculative decoding, a spec string such as
        "triforce:budget=256,gamma=6,draft_gamma=4" or a `kvjax.generation.speculative.TriForce`
        (docs/speculative.md): the target over its cache (`policy`, which must roll back)
        verifies drafts made over a TriForce retrieval cache, itself fed by a StreamingLLM
        level. Stop ids only (no stop strings), no on_token, prefill_chunk or share_prefixes.
        Stats add speculative, acceptance_rate (per verifying level), tokens_per_verify and
        target_forwards.
      draft_model: a loaded model with the target's vocabulary for the StreamingLLM level
        (None: the target model itself).
      policy_params: a pytree of arrays the policy reads as traced parameters instead of its
        shipped constants (`matryoshka`'s projections; `forward(..., policy_params=...)`).
        None (the default): the policy's own. Not with share_prefixes or speculative.

    Returns a `GenerateOutput`: texts, tokens [B, max_new_tokens], n_tokens [B], the final
    KV state and `stats`: prompt_tokens, generated_tokens; prefill_s and decode_s (run time,
    compilation excluded), prefill_compile_s, decode_compile_s and compile_s (tracing and
    compiling, about 0 when the programs are cached); prefill/decode tokens per second;
    kv_bytes (the state after decoding), kv_bytes_after_prefill, dense_kv_bytes (a dense
    cache of the tokens seen); kv_bytes_held, kv_bytes_used, kv_bytes_headroom,
    kv_bytes_read_per_step (what one decode step reads of the cache), dense_bytes_of_seen,
    device_bytes and host_bytes (the cache in device / host memory, `kvjax.host`) and
    host_bytes_read_per_step (copied from host memory per decode step) (`KVState.byte_stats`,
    docs/memory.md); policy (its spec);
    prompt_bucket and new_tokens_bucket (the static shapes compiled for).

    Raises TypeError / ValueError naming the argument for a bad argument, before anything
    is compiled."""
    call = _prepare(
        model,
        prompts,
        messages,
        implementation,
        policy=policy,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stop_ids=stop_ids,
        prefill_chunk=prefill_chunk,
        chat=chat,
        on_token=on_token,
    )
    if policy_params is not None:
        if (
            speculative is not None
            or draft_model is not None
            or (share_prefixes is not False and share_prefixes is not None)
        ):
            raise ValueError("policy_params is not supported with speculative decoding or share_prefixes")
        call.pp = {"policy_params": policy_params}
    if speculative is not None or draft_model is not None:
        if on_token is not None or (share_prefixes is not False and share_prefixes is not None):
            raise ValueError("speculative decoding runs the whole batch at once: on_token and share_prefixes are off")
        from .speculative import generate_speculative

        return generate_speculative(
            model, call, "triforce" if speculative is None else speculative, draft_model, implementation=implementation
        )
    if share_prefixes is not False and share_prefixes is not None:
        return _generate_shared(model, call, share_prefixes, on_token, prefill_chunk, implementation)
    if on_token is not None or call.req.options.stop:
        # stop strings are checked on the host between chunks, so a row stops early
        s = TokenStream(call, chunk_steps=1 if on_token is not None else 16)
        for piece in s:
            if on_token is not None:
                on_token(*piece)
        return s.output
    opts = call.req.options
    logits, state = call.prefill()
    args = (model.params, state, logits, jax.random.key(opts.seed), jnp.int32(opts.max_new_tokens))
    exe, call.times["decode_compile_s"] = _compiled(decode, args, {**call.decode_static(), **call.pp})
    del state  # donated: `decode` consumes the prefill state, so the cache never exists twice
    t0 = time.perf_counter()
    out, n_out, state = jax.block_until_ready(exe(*args, **call.pp))
    call.times["decode_s"] = time.perf_counter() - t0
    out = np.asarray(out)[:, : opts.max_new_tokens]
    n_out = np.asarray(n_out)
    texts = [model.tokenizer.decode(out[i, : n_out[i]]) for i in range(len(n_out))]
    return call.finish(out, n_out, state, texts)


def _generate_shared(model, call: _Call, share_prefixes, on_token, prefill_chunk, implementation) -> GenerateOutput:
    if share_prefixes is True:
        min_prefix = DEFAULT_MIN_PREFIX
    else:
        min_prefix = check_int("share_prefixes", share_prefixes, 1, none_means="no sharing")
    if on_token is not None or prefill_chunk is not None:
        raise ValueError(
            "share_prefixes runs whole groups at once: on_token and prefill_chunk are not supported with it"
        )
    out, n_out, texts, states, stats = generate_shared(model, call.req, implementation, min_prefix)
    return GenerateOutput(texts, out, n_out, states[0] if len(states) == 1 else None, stats)


class TokenStream:
    """Iterates over `StreamPiece`s as the tokens are generated; once exhausted, `output`
    holds the `GenerateOutput` (the same tokens as `generate`). See `stream`."""

    def __init__(self, call: _Call, chunk_steps: int = 1):
        self.call = call
        self.chunk_steps = check_int("chunk_steps", chunk_steps, 1)
        self.output: GenerateOutput | None = None
        self._it = self._run()

    def __iter__(self) -> Iterator[StreamPiece]:
        return self._it

    def __next__(self) -> StreamPiece:
        return next(self._it)

    def _run(self) -> Iterator[StreamPiece]:
        call, opts = self.call, self.call.req.options
        params, limit, pad = call.model.params, opts.max_new_tokens, call.model.config.pad_id
        rows = [RowText(call.model.tokenizer, opts.stop) for _ in call.req.ids]
        logits, state = call.prefill()
        static = call.decode_static()
        start_args = (state, logits, jax.random.key(opts.seed))
        start_static = {k: static[k] for k in ("config", "max_new_tokens", "sampler", "stop_ids")}
        steps_static = {k: v for k, v in static.items() if k != "max_new_tokens"}
        start, c0 = _compiled(decode_start, start_args, start_static)
        loop_shape = jax.eval_shape(lambda *a: decode_start(*a, **start_static), *start_args)
        steps, c1 = _compiled(decode_steps, (params, loop_shape, jnp.int32(0)), {**steps_static, **call.pp})
        call.times["decode_compile_s"] = c0 + c1
        clock = time.perf_counter()
        loop = start(*start_args)
        del state, start_args  # donated: the loop holds the only cache
        finished = np.zeros(len(rows), bool)  # a stop id, a stop string, or the limit ended the row
        seen = 0  # steps whose tokens were handed out
        while True:
            out, n_out, done, step = jax.device_get((loop.out, loop.n_out, loop.done, loop.step))
            at_limit = int(step) >= limit
            for j in range(seen, min(int(step), limit)):
                for r, row in enumerate(rows):
                    if finished[r] or j >= n_out[r]:
                        continue
                    last = j == n_out[r] - 1 and (bool(done[r]) or at_limit)
                    piece = StreamPiece(r, int(out[r, j]), row.push(out[r, j], last))
                    finished[r] = last or row.stopped
                    call.times["decode_s"] += time.perf_counter() - clock
                    yield piece
                    clock = time.perf_counter()
            seen = int(step)
            if at_limit or finished.all():
                break
            if (finished & ~done).any():  # stopped by a stop string: let the device skip the row
                loop = loop.replace(done=jnp.asarray(done | finished))
            loop = steps(params, loop, jnp.int32(min(seen + self.chunk_steps, limit)), **call.pp)
        out = np.array(out[:, :limit])
        n_tokens = np.array([row.n_tokens for row in rows], np.int32)
        for r, n in enumerate(n_tokens):
            out[r, n:] = pad
        state = jax.block_until_ready(loop.state)
        call.times["decode_s"] += time.perf_counter() - clock
        self.output = call.finish(out, n_tokens, state, [row.text for row in rows])


def stream(
    model,
    prompts: str | Sequence[str] | None = None,
    *,
    messages: Sequence[Mapping[str, str]] | Sequence[Sequence[Mapping[str, str]]] | None = None,
    policy: Policy | str = "dense",
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    sampler: Sampler | None = None,
    seed: int = 0,
    stop: str | Sequence[str] | None = None,
    stop_ids: Sequence[int] | None = None,
    chat: bool = False,
    prefill_chunk: int | None = None,
    implementation: str | None = None,
    chunk_steps: int = 1,
) -> TokenStream:
    """`generate`, token by token: returns a `TokenStream` that yields
    `StreamPiece(row, token_id, text)` for every generated token in order; after the loop its
    `output` is the `GenerateOutput` (the tokens equal `generate`'s).

        s = kvjax.stream(model, "Once upon a time", max_new_tokens=32)
        for piece in s:
            print(piece.text, end="", flush=True)
        s.output.stats

    The arguments are `generate`'s (checked at the call, before anything runs), plus
    chunk_steps: decode steps per compiled call between two host reads (1: every token as
    soon as it exists; more: fewer host round trips, pieces in bursts)."""
    call = _prepare(
        model,
        prompts,
        messages,
        implementation,
        policy=policy,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop,
        stop_ids=stop_ids,
        prefill_chunk=prefill_chunk,
        chat=chat,
    )
    return TokenStream(call, chunk_steps)
