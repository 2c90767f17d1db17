"""`kvjax.serve.Engine`: continuous batching over a live KV state with compressed rows.

    engine = Engine(model, policy="snapkv:budget=0.2+kivi:bits=2", rows=16, token_budget=512)
    h = engine.submit(model.tokenizer.encode("Hello"), max_tokens=32)
    engine.run_until_idle()            # or engine.start(): a thread steps while work is queued
    h.text, h.tokens, h.finish_reason

What a step does (one `step()` call):

1. Admission: waiting requests take free rows, oldest first, while the KV bytes the live state
   would then reserve stay within `max_kv_bytes` (a compressed policy's rows are smaller, so
   more are admitted). An admitted request gets its own one-row prefill state.
2. Scheduling (`kvjax.serve.scheduler`, pure Python): Sarathi-Serve's stall-free batching —
   one decode token for every running request, then prompt chunks of the admitted requests up
   to the token budget (or, with `schedule="prefill-first"`, chunks only while prompts wait).
3. Decode: ONE jitted forward over the live state's rows (every running request's last token
   at its own position; idle rows carry padding, position -1), then per-row sampling
   (`kvjax.serve.sampling`: greedy, temperature, top-k, top-p per request).
4. Prefill chunks: each request being prefilled has its own one-row state; the step's
   chunks that share a program and a write offset (same width, same tokens already in, same
   static sizes: e.g. requests of similar lengths that arrived together) run as one jitted
   forward over their stacked states (the policy's prefill step, `LayerContext.final=False`).
   A prompt's last chunk runs with `final=True`, so the policy compresses each row then
   (SnapKV selects, KIVI quantizes), the first tokens are sampled from its logits, and the
   compressed rows are written into the live state (`kvjax.policies.rows.set_rows`), where
   they decode from the next step on.

So a step is one batched decode forward plus up to budget-many prompt tokens in chunk
forwards (one per group), not one fused forward of a mixed batch: the policies' prefill and decode
steps are different programs (`LayerContext.phase` is static) and compression runs on a
whole prompt, so a mixed batch would need per-row phases inside every policy. No decode waits
for more than one step's worth of chunks (the budget), which is the stall-free property.

Memory grows with use (vAttention's aim, with XLA's static shapes): the live state's shape is
a bucket (rows, prompt bound, decode headroom). It grows when a request that needs more joins
(each leaf padded at the end of its grown axes with empty slots, positions -1, in one jitted
copy that donates the old state; a new bucket compiles new programs, a known one reuses
them) and is dropped when no request is left (the next request starts at its own size).
Rows are padded only at the end of their slot axes, so the engine takes policies whose decode
state is append-ordered: dense and prompt-time eviction slot caches, the quantized caches
(`kvjax.quant`) and their compositions; a policy that evicts while decoding (H2O, StreamingLLM,
TOVA) or keeps host-resident leaves is refused.

Greedy requests produce the tokens `kvjax.generate` gives each of them alone (the row sits in
a larger, padded state, which changes no visible slot). Sampled requests use per-request keys
(fold_in(key(seed), token index)), so they are reproducible but do not repeat `generate`'s
sampled tokens.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..generation.request import check_int, check_policy, check_stop, check_stop_ids
from ..generation.steps import bucket_length, maintain_state, maintenance_period, new_tokens_bucket, prefill
from ..generation.text import RowText
from ..models.forward import forward, hidden_states
from ..policies import rows as row_ops
from ..policies.compose import Compose
from ..sampling import Sampler
from ..state import KVState, LayerContext, bound_length, leaves_nbytes
from . import scheduler
from .sampling import sample_rows

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclasses.dataclass(frozen=True)
class Event:
    """What a request's `on_event` callback receives: a generated token (`token_id`, the text
    it makes printable, "" while held back), and on the last event `finished` with the reason
    (stop, length, cancelled, error) and, for an error, its message."""

    rid: int
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None


class Handle:
    """A submitted request: `tokens` (generated ids, a stop token included, as
    `GenerateOutput.n_tokens` counts them), `text` (cut at a stop string), `finish_reason`,
    `prompt_tokens`; `result(timeout)` waits for the end; `cancel()` frees its row."""

    def __init__(self, engine: Engine, rid: int, prompt_tokens: int):
        self._engine = engine
        self.rid = rid
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self._done = threading.Event()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        self._engine.cancel(self.rid)

    def result(self, timeout: float | None = None) -> Handle:
        """Wait until the request ends (TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.rid} did not finish within {timeout} s")
        return self


@dataclasses.dataclass
class _Req:
    rid: int
    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_ids: tuple[int, ...]
    text: RowText
    handle: Handle
    on_event: Callable[[Event], object] | None
    bound: int  # static bound on the prompt length its compressed row is sized from
    headroom: int  # decode slots its row keeps (a power of two >= max_tokens)
    bucket: int  # slots of its prefill state
    fed: int = 0
    row: int | None = None
    state: KVState | None = None
    cancelled: bool = False

    @property
    def length(self) -> int:
        return len(self.ids)


def _policy_parts(policy) -> tuple:
    return tuple(policy.policies) if isinstance(policy, Compose) else (policy,)


def observation_window(policy) -> int:
    """The most prompt tokens a policy's compression looks at from the end of the prompt (an
    eviction method's `window`, 0 for none): a prompt's last chunk must hold them."""
    return max((int(getattr(p, "window", 0) or 0) for p in _policy_parts(policy)), default=0)


def check_servable(policy) -> None:
    """Raise ValueError for a policy the engine cannot batch (module doc)."""
    if policy.evicts_on_decode:
        raise ValueError(
            f"policy {policy.spec()!r} evicts while decoding; the serving engine takes dense, prompt-time "
            "eviction (snapkv, pyramidkv, ...) and quantized (kivi, ...) caches and their compositions"
        )
    for p in _policy_parts(policy):
        if getattr(p, "host_leaves", False) or p.name in ("offload", "shadowkv", "quest", "a2ats"):
            raise ValueError(f"policy {policy.spec()!r}: the serving engine does not batch {p.name} caches")


def rows_bucket(n: int, limit: int) -> int:
    """Rows of a live state holding rows 0..n-1: a power of two up to 8, then a multiple of 8,
    at most `limit`."""
    b = scheduler.pow2_ceil(n) if n <= 8 else -(-n // 8) * 8
    return min(b, limit)


def _leaf_name(path) -> str:
    last = path[-1] if path else None
    return str(getattr(last, "name", getattr(last, "key", "")))


def pad_state(tree: KVState, target: KVState, batch: int) -> KVState:
    """`tree` with every array leaf padded at the end of each axis to `target`'s leaf shape
    (a `jax.eval_shape` result; axis 0 to `batch` rows): K/V and counters with 0, positions
    (`*pos` leaves) with -1, i.e. empty slots. Write offsets become per row; the static fields
    of the result are `target`'s. Raises ValueError where a leaf is larger than its target."""
    tree = row_ops.per_row_fill(tree)
    src = jax.tree_util.tree_flatten_with_path(tree)[0]
    tgt, treedef = jax.tree_util.tree_flatten(target)
    if len(src) != len(tgt):
        raise ValueError(f"pad_state: {len(src)} leaves for a target of {len(tgt)}")
    out = []
    for (path, x), t in zip(src, tgt):
        if jnp.ndim(x) == 0:
            out.append(x)
            continue
        # a per-row write offset [B] (its target is the scalar a prefill makes) keeps shape [B]
        shape = (batch,) + tuple(t.shape[1:]) if len(t.shape) else (batch,)
        if x.ndim != len(shape) or any(a > b for a, b in zip(x.shape, shape)):
            raise ValueError(f"pad_state: leaf {jax.tree_util.keystr(path)} {x.shape} does not fit {shape}")
        fill = -1 if _leaf_name(path).endswith("pos") else 0
        out.append(jnp.pad(x, [(0, b - a) for a, b in zip(x.shape, shape)], constant_values=fill))
    return treedef.unflatten(out)


# ---- jitted programs --------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "policy", "prompt_len", "max_new", "dtype"))
def _init_row(*, config, policy, prompt_len, max_new, dtype):
    return policy.init_state(config, 1, prompt_len, max_new, dtype)


def _stack(states: list) -> KVState:
    """One-row states of equal shapes (and equal scalar write offsets) stacked into rows."""
    return jax.tree.map(lambda *xs: xs[0] if jnp.ndim(xs[0]) == 0 else jnp.concatenate(xs, axis=0), *states)


def _keys(seeds, counters):
    return jax.vmap(lambda s, n: jax.random.fold_in(jax.random.key(s), n))(seeds, counters)


_CHUNK_STATIC = ("config", "policy", "dtype", "implementation", "final", "prompt_len", "max_new", "longest")


def _prefill_chunk(
    params, state, tokens, positions, last, seed, temperature, top_k, top_p, *, config, policy, dtype,
    implementation, final, prompt_len, max_new, longest,
):  # fmt: skip
    """One prompt chunk of k stacked one-row states: tokens, positions [k, W] (-1 = padding).
    With `final` the policy compresses after it and each row's first token is sampled from the
    logits at its column `last` [k]; otherwise returns tokens -1."""
    ctx = LayerContext(0, config, "prefill", final, prompt_len, max_new, implementation, longest)
    if not final:
        _, state = hidden_states(params, tokens, positions, state, config=config, policy=policy, ctx=ctx, dtype=dtype)
        return jnp.full((tokens.shape[0],), -1, jnp.int32), state
    logits, state = forward(
        params, tokens, positions, state, config=config, policy=policy, ctx=ctx, dtype=dtype, logits_at=last
    )
    keys = _keys(seed, jnp.zeros(seed.shape, jnp.int32))
    return sample_rows(logits, keys, temperature, top_k, top_p), state


# A middle chunk writes into its state in place (donated); the last one returns a compressed
# state of other shapes, so its input cannot be reused and is not donated.
_middle_chunk = jax.jit(_prefill_chunk, static_argnames=_CHUNK_STATIC, donate_argnames=("state",))
_last_chunk = jax.jit(_prefill_chunk, static_argnames=_CHUNK_STATIC)


@functools.partial(
    jax.jit, static_argnames=("config", "policy", "dtype", "implementation", "max_new"), donate_argnames=("state",)
)
def _decode_step(
    params, state, tokens, positions, seeds, counters, temperature, top_k, top_p, *, config, policy, dtype,
    implementation, max_new,
):  # fmt: skip
    """One decode token for every row of the live state: tokens, positions [B] (-1 = idle
    row); returns (sampled tokens [B], state)."""
    ctx = LayerContext(0, config, "decode", True, 0, max_new, implementation)
    if maintenance_period(policy, ctx):  # the upkeep runs every that many steps (`_maintain`)
        ctx = dataclasses.replace(ctx, deferred=True)
    b = tokens.shape[0]
    logits, state = forward(
        params,
        tokens[:, None],
        positions[:, None],
        state,
        config=config,
        policy=policy,
        ctx=ctx,
        dtype=dtype,
        logits_at=jnp.zeros((b,), jnp.int32),
    )
    return sample_rows(logits, _keys(seeds, counters), temperature, top_k, top_p), state


@functools.partial(
    jax.jit, static_argnames=("config", "policy", "dtype", "implementation", "max_new"), donate_argnames=("state",)
)
def _maintain(state, *, config, policy, dtype, implementation, max_new):
    """The upkeep `_decode_step` defers (`Policy.maintain` on every layer: a quantizer's flush)."""
    del dtype
    return maintain_state(policy, state, LayerContext(0, config, "decode", True, 0, max_new, implementation))


#: Jitted grow / insert programs by (config, policy, dtype, kind, bucket): `Engine._programs_fn`.
_FNS: dict = {}


class Engine:
    """Continuous batching with a compressed KV cache (module doc).

    Args:
      model: a loaded model (`kvjax.load(...)`).
      policy: the KV-cache policy every request's prompt is compressed with (a `Policy` or a
        spec string).
      rows: the most requests decoding at once (rows of the live state).
      token_budget: tokens one step computes: a decode token per running request plus prompt
        chunks (padded widths).
      min_chunk: the narrowest prompt chunk (a power of two <= 64); chunk widths are powers of
        two up to 64, then multiples of 64 (`kvjax.serve.scheduler`).
      max_kv_bytes: admit a request only while the live state then reserves at most this many
        KV bytes (None: rows alone limit admission).
      schedule: "stall-free" (Sarathi-Serve) or "prefill-first" (prompt chunks run while
        any prompt waits, decodes pause; the baseline stall-free is measured against).
      implementation: the attention implementation (None: the backend's default).
    """

    def __init__(
        self,
        model,
        policy="dense",
        *,
        rows: int = 8,
        token_budget: int = 512,
        min_chunk: int = 16,
        max_kv_bytes: int | None = None,
        schedule: str = "stall-free",
        implementation: str | None = None,
    ):
        self.model = model
        self.policy = check_policy(policy)
        check_servable(self.policy)
        self.rows = check_int("rows", rows, 1)
        self.min_chunk = check_int("min_chunk", min_chunk, 1)
        if self.min_chunk & (self.min_chunk - 1) or self.min_chunk > scheduler.QUANTUM:
            raise ValueError(f"min_chunk={min_chunk} must be a power of two <= {scheduler.QUANTUM}")
        self.min_final = observation_window(self.policy)
        need = scheduler.min_budget(self.rows, self.min_chunk, self.min_final)
        self.token_budget = check_int("token_budget", token_budget, 1)
        if self.token_budget < need:
            raise ValueError(
                f"token_budget={token_budget} must be >= {need}: one decode token per row ({rows}) plus a prompt's "
                f"last chunk (policy {self.policy.spec()!r} compresses after a chunk holding its last "
                f"{self.min_final} tokens)"
            )
        self.max_kv_bytes = check_int("max_kv_bytes", max_kv_bytes, 1, none_means="no limit")
        if schedule not in scheduler.SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; expected one of {scheduler.SCHEDULES}")
        self.schedule = schedule
        self.implementation = implementation
        self._common = dict(config=model.config, policy=self.policy, dtype=model.dtype, implementation=implementation)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count()
        self._inbox: list[_Req] = []
        self._cancel: set[int] = set()
        self._waiting: collections.deque[_Req] = collections.deque()
        self._prefilling: list[_Req] = []
        self._running: dict[int, _Req] = {}  # row -> request
        self._state: KVState | None = None
        self._bucket: tuple[int, int, int] | None = None  # (rows, prompt bound, headroom)
        self._targets: dict = {}
        self._programs: dict = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = collections.Counter()
        # Decode steps between two upkeeps of the live state (a quantizer's flush, `_maintain`).
        self._period = maintenance_period(self.policy, LayerContext(0, model.config, "decode", True))
        self._since_maintain = 0

    # ---- submitting -------------------------------------------------------------------
    def submit(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: str | Sequence[str] | None = None,
        stop_ids: Sequence[int] | None = None,
        on_event: Callable[[Event], object] | None = None,
    ) -> Handle:
        """Queue a request: `prompt` (text, or token ids), at most `max_tokens` new tokens,
        sampling as `kvjax.generate` takes it, stop strings / stop ids (default: the
        tokenizer's end-of-sequence ids). `on_event(Event)` is called from the engine's thread
        for every token and once at the end. Thread-safe.

        Raises TypeError / ValueError for a bad argument, a prompt that with max_tokens exceeds
        the model's positions (refused, never truncated), or one whose row alone exceeds
        `max_kv_bytes`."""
        tok, cfg = self.model.tokenizer, self.model.config
        if isinstance(prompt, str):
            ids = tok.encode(prompt) if prompt else []
        elif isinstance(prompt, (Sequence, np.ndarray)) and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompt
        ):
            ids = [int(i) for i in prompt]
            if any(not 0 <= i < cfg.vocab_size for i in ids):
                raise ValueError(f"prompt holds token ids outside the vocabulary [0, {cfg.vocab_size})")
        else:
            raise TypeError(f"prompt={prompt!r} must be a string or a list of token ids")
        if not ids:
            raise ValueError("the prompt is empty (zero tokens)")
        max_tokens = check_int("max_tokens", max_tokens, 1)
        if len(ids) + max_tokens > cfg.max_position:
            raise ValueError(
                f"prompt of {len(ids)} tokens + max_tokens={max_tokens} exceeds the model's context of "
                f"{cfg.max_position} tokens"
            )
        sampler = Sampler(temperature, top_k, top_p)  # checks the values
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
        stops = check_stop_ids(stop_ids)
        stops = tuple(tok.eos_ids) if stops is None else stops
        width = bucket_length(len(ids))
        headroom = new_tokens_bucket(max_tokens)
        bound = bound_length(len(ids), width)
        self.policy.validate(width, cfg)
        if self.max_kv_bytes is not None and self.row_bytes(bound, headroom) > self.max_kv_bytes:
            raise ValueError(
                f"a request of {len(ids)} prompt tokens and max_tokens={max_tokens} needs "
                f"{self.row_bytes(bound, headroom)} KV bytes under {self.policy.spec()!r}, more than "
                f"max_kv_bytes={self.max_kv_bytes}"
            )
        rid = next(self._ids)
        handle = Handle(self, rid, len(ids))
        req = _Req(
            rid=rid,
            ids=ids,
            max_tokens=max_tokens,
            temperature=float(sampler.temperature),
            top_k=int(sampler.top_k),
            top_p=float(sampler.top_p),
            seed=int(seed),
            stop_ids=stops,
            text=RowText(tok, check_stop(stop)),
            handle=handle,
            on_event=on_event,
            bound=bound,
            headroom=headroom,
            bucket=scheduler.prefill_bucket(len(ids)),
        )
        with self._wake:
            self._inbox.append(req)
            self._wake.notify()
        return handle

    def cancel(self, rid: int) -> None:
        """Cancel request `rid` (a no-op once it has finished); its row is freed at the next
        step and it ends with finish_reason "cancelled". Thread-safe."""
        with self._wake:
            self._cancel.add(int(rid))
            self._wake.notify()

    # ---- sizes ------------------------------------------------------------------------
    def _target(self, batch: int, bound: int, headroom: int) -> KVState:
        """Shapes (`jax.eval_shape`) of a decode-ready state of `batch` rows whose prompts are
        at most `bound` tokens, with `headroom` decode slots."""
        key = (batch, bound, headroom)
        if key not in self._targets:

            def run(params):
                toks = jnp.zeros((batch, bound), jnp.int32)
                lens = jnp.full((batch,), bound, jnp.int32)
                return prefill(params, toks, lens, max_new_tokens=headroom, longest=bound, **self._common)[1]

            self._targets[key] = jax.eval_shape(run, self.model.params)
        return self._targets[key]

    def row_bytes(self, bound: int, headroom: int) -> int:
        """KV bytes one row holds for prompts of at most `bound` tokens and `headroom` decode
        slots under the engine's policy (every layer: codes, scales, positions, windows)."""
        return leaves_nbytes(self._target(1, bound, headroom).layers)

    def _bucket_with(self, reqs: Sequence[_Req], extra_row: int = -1) -> tuple[int, int, int]:
        rows_used = max([r.row for r in reqs if r.row is not None] + [extra_row]) + 1
        bound = max(r.bound for r in reqs)
        headroom = max(r.headroom for r in reqs)
        b = rows_bucket(max(rows_used, 1), self.rows)
        if self._bucket is not None:
            b0, bd0, h0 = self._bucket
            return max(b, b0), max(bound, bd0), max(headroom, h0)
        return b, bound, headroom

    def reserved_bytes(self, bucket: tuple[int, int, int]) -> int:
        b, bound, headroom = bucket
        return b * self.row_bytes(bound, headroom)

    # ---- stepping ---------------------------------------------------------------------
    def _emit(self, req: _Req, token: int | None, text: str, finish: str | None = None, error: str | None = None):
        h = req.handle
        if token is not None:
            h.tokens.append(int(token))
        h.text += text
        if finish is not None:
            h.finish_reason, h.error = finish, error
        if req.on_event is not None:
            try:
                req.on_event(Event(req.rid, token, text, finish is not None, finish, error))
            except Exception:  # a failing consumer (a closed connection) must not stop the engine
                self._cancel.add(req.rid)
        if finish is not None:
            h._done.set()

    def _finish(self, req: _Req, reason: str, error: str | None = None) -> None:
        if req.row is not None and self._running.get(req.row) is req:
            del self._running[req.row]
        if req in self._prefilling:
            self._prefilling.remove(req)
        req.state = None
        self._counts[f"finished_{reason}"] += 1
        self._emit(req, None, "", reason, error)

    def _take_inbox(self) -> None:
        with self._wake:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            cancel, self._cancel = self._cancel, set()
        if not cancel:
            return
        for req in list(self._waiting):
            if req.rid in cancel:
                self._waiting.remove(req)
                self._finish(req, "cancelled")
        for req in list(self._prefilling) + list(self._running.values()):
            if req.rid in cancel:
                self._finish(req, "cancelled")

    def _free_row(self) -> int | None:
        taken = {r.row for r in self._prefilling} | set(self._running)
        return next((i for i in range(self.rows) if i not in taken), None)

    def _admit(self) -> None:
        while self._waiting:
            row = self._free_row()
            if row is None:
                return
            req = self._waiting[0]
            live = list(self._prefilling) + list(self._running.values())
            over = self.max_kv_bytes is not None and live
            if over and self.reserved_bytes(self._bucket_with([*live, req], row)) > self.max_kv_bytes:
                return
            self._waiting.popleft()
            req.row = row  # its prefill state is made when its first chunk runs (`_chunk`)
            self._prefilling.append(req)
            self._counts["admitted"] += 1

    def admit_waiting(self) -> int:
        """Take the queued requests and admit those that fit (rows, `max_kv_bytes`) without
        running anything: what `step` does first. Returns how many are admitted in all
        (prefilling or running)."""
        self._take_inbox()
        self._admit()
        return len(self._prefilling) + len(self._running)

    def _note_program(self, *key) -> None:
        self._programs[key] = self._programs.get(key, 0) + 1

    def _grow(self, bucket: tuple[int, int, int]) -> None:
        """Pad the live state to `bucket` (one jitted copy; the old state is donated)."""
        if self._state is None or bucket == self._bucket:
            self._bucket = bucket
            return
        target = self._target(1, bucket[1], bucket[2])
        fn = self._programs_fn(("grow", bucket), lambda s: pad_state(s, target, bucket[0]))
        self._state = fn(self._state)
        self._bucket = bucket
        self._counts["grows"] += 1

    def _programs_fn(self, key, fn):
        """A jitted `fn` (donating its first argument) kept per key (with the model's config,
        policy and dtype, shared by every engine): a bucket compiles once per process."""
        self._note_program(*key)
        key = (self.model.config, self.policy, str(jnp.dtype(self.model.dtype)), *key)
        if key not in _FNS:
            jitted = jax.jit(fn, donate_argnums=0)

            def call(*args):
                with warnings.catch_warnings():  # leaves that change shape cannot be donated
                    warnings.filterwarnings("ignore", "Some donated buffers were not usable")
                    return jitted(*args)

            _FNS[key] = call
        return _FNS[key]

    def _insert(self, reqs: list[_Req], state: KVState) -> None:
        """Write the requests' compressed rows (`state`, one row each, in order) into the live
        state, growing it first if needed."""
        live = list(self._running.values()) + reqs
        bucket = self._bucket_with(live, max(r.row for r in reqs))
        target = self._target(1, bucket[1], bucket[2])
        first = self._state is None
        if first:  # the live state starts as copies of the first row (idle rows are overwritten on insert)
            self._bucket = bucket
            fn = self._programs_fn(
                ("first", bucket),
                lambda many: row_ops.broadcast_rows(pad_state(row_ops.take_rows(many, [0]), target, 1), bucket[0]),
            )
            self._state = fn(state if len(reqs) == 1 else jax.tree.map(jnp.copy, state))  # donated
        else:
            self._grow(bucket)
        if not first or len(reqs) > 1:
            fn = self._programs_fn(
                ("insert", bucket),
                lambda live, many, r: row_ops.set_rows(live, r, pad_state(many, target, r.shape[0])),
            )
            self._state = fn(self._state, state, jnp.asarray([r.row for r in reqs], jnp.int32))
        for req in reqs:
            self._running[req.row] = req

    def _push(self, req: _Req, token: int) -> None:
        """Hand out one generated token; finish the request on a stop or at max_tokens."""
        stop = token in req.stop_ids
        last = stop or len(req.handle.tokens) + 1 >= req.max_tokens
        piece = req.text.push(token, last)
        if req.text.stopped:
            self._emit(req, token, piece)
            self._finish(req, "stop")
        elif last:
            self._emit(req, token, piece)
            self._finish(req, "stop" if stop else "length")
        else:
            self._emit(req, token, piece)

    def _decode(self, rids: list[int]) -> None:
        b = self._bucket[0]
        tokens = np.zeros(b, np.int32)
        positions = np.full(b, -1, np.int32)
        seeds = np.zeros(b, np.uint32)
        counters = np.zeros(b, np.int32)
        temp, top_k, top_p = np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32)
        want = set(rids)
        reqs = {row: r for row, r in self._running.items() if r.rid in want}
        for row, r in reqs.items():
            n = len(r.handle.tokens)
            tokens[row] = r.handle.tokens[-1]
            positions[row] = r.length + n - 1
            seeds[row], counters[row] = r.seed, n
            temp[row], top_k[row], top_p[row] = r.temperature, r.top_k, r.top_p
        self._note_program("decode", self._bucket)
        with warnings.catch_warnings():
            # a quantized cache's flush rebuilds some leaves each step: those cannot be donated
            warnings.filterwarnings("ignore", "Some donated buffers were not usable")
            out, self._state = _decode_step(
                self.model.params,
                self._state,
                jnp.asarray(tokens),
                jnp.asarray(positions),
                jnp.asarray(seeds),
                jnp.asarray(counters),
                jnp.asarray(temp),
                jnp.asarray(top_k),
                jnp.asarray(top_p),
                max_new=self._bucket[2],
                **self._common,
            )
        self._since_maintain += 1
        if self._period and self._since_maintain >= self._period:
            self._state = _maintain(self._state, max_new=self._bucket[2], **self._common)
            self._since_maintain = 0
        out = np.asarray(out)
        self._counts["decode_tokens"] += len(reqs)
        for row, r in reqs.items():
            self._push(r, int(out[row]))

    def _chunk_static(self, c: scheduler.Chunk) -> tuple:
        """(static arguments of a chunk's program, the key that groups chunks into one call:
        same program, same write offset)."""
        req = next(r for r in self._prefilling if r.rid == c.rid)
        if c.final:  # the policy compresses after it: the chunk ends at prompt_len, sized from the bound
            static = dict(final=True, prompt_len=req.fed + c.width, max_new=req.headroom, longest=req.bound)
        else:  # a middle chunk appends and attends only: one program per (state, width)
            static = dict(final=False, prompt_len=req.bucket, max_new=0, longest=0)
        return static, (req.bucket, req.fed, c.width, tuple(sorted(static.items())))

    def _chunks(self, chunks: list[scheduler.Chunk], static: dict) -> None:
        """Run chunks that share a program and a write offset as one forward over their
        requests' stacked one-row states; after last chunks, sample each first token and
        write the compressed rows into the live state together."""
        reqs = [next(r for r in self._prefilling if r.rid == c.rid) for c in chunks]
        cfg = self.model.config
        for req in reqs:
            if req.state is None:
                req.state = _init_row(
                    config=cfg,
                    policy=self.policy,
                    prompt_len=req.bucket,
                    max_new=0,  # the decode headroom is added when the row joins the live state
                    dtype=self.model.dtype,
                )
        k, width, fed = len(reqs), chunks[0].width, reqs[0].fed
        toks = np.full((k, width), cfg.pad_id, np.int32)
        pos = np.full((k, width), -1, np.int32)
        for i, (req, c) in enumerate(zip(reqs, chunks)):
            toks[i, : c.tokens] = req.ids[fed : fed + c.tokens]
            pos[i, : c.tokens] = np.arange(fed, fed + c.tokens)
        state = reqs[0].state if k == 1 else _stack([r.state for r in reqs])
        for req in reqs:
            req.state = None
        self._note_program("chunk", k, reqs[0].bucket, width, tuple(sorted(static.items())))
        tok, state = (_last_chunk if static["final"] else _middle_chunk)(
            self.model.params,
            state,
            jnp.asarray(toks),
            jnp.asarray(pos),
            jnp.asarray([c.tokens - 1 for c in chunks], jnp.int32),
            jnp.asarray([r.seed for r in reqs], jnp.uint32),
            jnp.asarray([r.temperature for r in reqs], jnp.float32),
            jnp.asarray([r.top_k for r in reqs], jnp.int32),
            jnp.asarray([r.top_p for r in reqs], jnp.float32),
            **static,
            **self._common,
        )
        for req, c in zip(reqs, chunks):
            req.fed += c.tokens
            self._counts["prefill_tokens"] += c.tokens
            self._counts["prefill_padded_tokens"] += width
        self._counts["prefill_calls"] += 1
        self._counts["prefill_chunks"] += k
        if not static["final"]:
            for i, req in enumerate(reqs):
                req.state = state if k == 1 else row_ops.take_rows(state, [i])
            return
        for req in reqs:
            self._prefilling.remove(req)
        self._insert(reqs, state)
        tok = np.asarray(tok)
        for i, req in enumerate(reqs):
            self._push(req, int(tok[i]))

    def step(self) -> bool:
        """Run one engine step (module doc). Returns False when there was nothing to do."""
        self._take_inbox()
        self._admit()
        if not self._running and not self._prefilling:
            if self._state is not None:  # idle: give the live state back; the next request starts small
                self._state, self._bucket = None, None
                self._counts["shrinks"] += 1
            return False
        plan = scheduler.schedule(
            [r.rid for r in self._running.values()],
            [scheduler.Prefilling(r.rid, r.length, r.fed, r.bucket) for r in self._prefilling],
            self.token_budget,
            min_chunk=self.min_chunk,
            min_final=self.min_final,
            policy=self.schedule,
        )
        if plan.decodes:
            self._decode(plan.decodes)
        groups: dict = {}
        for c in plan.chunks:  # chunks sharing a program and a write offset run as one call
            static, key = self._chunk_static(c)
            groups.setdefault(key, (static, []))[1].append(c)
        for static, chunks in groups.values():
            while chunks:  # groups of power-of-two sizes: few distinct batch shapes to compile
                k = scheduler.pow2_floor(len(chunks))
                self._chunks(chunks[:k], static)
                chunks = chunks[k:]
        self._counts["steps"] += 1
        self._counts["step_tokens_max"] = max(self._counts["step_tokens_max"], plan.tokens)
        return True

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until no request is left (or `max_steps`); returns the steps run."""
        n = 0
        while (max_steps is None or n < max_steps) and self.step():
            n += 1
        return n

    # ---- thread -----------------------------------------------------------------------
    def start(self) -> Engine:
        """Step in a background thread (daemon) until `stop()`; idle, it waits for work."""
        if self._thread is not None:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="kvjax-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the background thread (requests still queued stay queued)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stopping:
            try:
                worked = self.step()
            except Exception as e:  # fail what was in flight, keep serving
                self._fail_all(f"{type(e).__name__}: {e}")
                worked = False
            if not worked:
                with self._wake:
                    if not self._inbox and not self._cancel and not self._stopping:
                        self._wake.wait(0.5)

    def _fail_all(self, message: str) -> None:
        for req in list(self._prefilling) + list(self._running.values()):
            self._finish(req, "error", message)
        self._state, self._bucket = None, None
        self._counts["errors"] += 1

    # ---- stats ------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """steps, admitted, decode_tokens, prefill_tokens (true prompt tokens) and
        prefill_padded_tokens, prefill_chunks and prefill_calls (chunks sharing a program and
        a write offset run as one call), finished_<reason> counts, grows and shrinks of the live state,
        step_tokens_max (the most tokens one step computed, <= token_budget), running,
        prefilling and waiting requests, bucket (rows, prompt bound, headroom of the live
        state), kv_bytes_reserved (the live state, every row), kv_bytes_needed (what the live
        requests' rows need at their own sizes), kv_bytes_prefill (the one-row full-precision
        states of prompts being prefilled, outside the live state), programs (distinct compiled
        shapes used)."""
        bucket = self._bucket
        needed = sum(self.row_bytes(r.bound, r.headroom) for r in [*self._running.values(), *self._prefilling])
        return {
            "steps": 0,
            **{k: int(v) for k, v in self._counts.items()},
            "running": len(self._running),
            "prefilling": len(self._prefilling),
            "waiting": len(self._waiting) + len(self._inbox),
            "bucket": bucket,
            "kv_bytes_reserved": 0 if self._state is None else int(self._state.kv_bytes_held),
            "kv_bytes_needed": int(needed),
            "kv_bytes_prefill": int(sum(r.state.kv_bytes_held for r in self._prefilling if r.state is not None)),
            "programs": len(self._programs),
            "policy": self.policy.spec(),
            "schedule": self.schedule,
        }
