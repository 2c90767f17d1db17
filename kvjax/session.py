"""Compress a context once, ask it many questions: `kvjax.Session`.

    with kvjax.Session(model, document, policy="snapkv:budget=0.2") as s:
        s.ask("\\nQuestion: who wrote it?\\nAnswer:").texts[0]
        s.ask(["\\nQ: when?\\nA:", "\\nQ: where?\\nA:"])          # two questions, one batch
        s.stats                                                   # one prefill, however many asks

The context is prefilled and compressed by the policy once, with the question excluded (what
kvpress's pipeline does): the compressed state is kept, and each `ask` appends its question
to a copy of it through the policy's decode step (`kvjax.generation.resume.extend`), then
decodes the answer. Several questions are rows of one batch over the same state: where the
kept state is a slot cache decoded by plain append + attend (dense, prompt-time eviction) the
rows read one copy of it as a shared prefix (`SharedPrefixKV`: each decode step reads it once),
otherwise each row gets its own copy (`rows.broadcast_rows`). Nothing is recompressed and the
kept state is never written (`decode` donates only copies).

`extend` appends tokens to the kept state for good (a conversation's history, SCBench's
multi-turn mode); a session can also hold several contexts as rows (one question per row),
which is how `kvjax eval`'s multi-turn tasks run.

Tokens are concatenated: the context's ids, then the question's (tokenized alone, no special
tokens), so start a question with the separator it needs ("\\n", " ").
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .generation.api import GenerateOutput
from .generation.request import check_int, check_model, check_policy, check_sampler, check_stop, check_stop_ids
from .generation.resume import appends_in_chunks, feed, pad_rows, pads_safely
from .generation.steps import bucket_length, decode, new_tokens_bucket, prefill
from .generation.text import cut_at_stop
from .policies import rows
from .policies.base import Policy
from .policies.eviction import EvictionPolicy
from .policies.shared_prefix import SharedPrefix, shared_prefix_state
from .state import KVState, SlotKV, bound_length


def shares_kept_state(policy, state: KVState) -> bool:
    """True when questions can read one copy of the kept state as a shared prefix
    (`SharedPrefixKV`) instead of a copy per question: every layer is a slot cache and the
    policy's decode step is the plain append + attend (dense, prompt-time eviction), which the
    two-level attention computes exactly."""
    cls = type(policy)
    plain = cls.decode in (Policy.decode, EvictionPolicy.decode) and cls.attend is Policy.attend
    return plain and not policy.evicts_on_decode and all(isinstance(x, SlotKV) for x in state.layers)


#: Appended pieces (questions, history) are padded to a multiple of this many tokens where the
#: policy allows padding, so questions of similar lengths share one compiled program.
PIECE_MULTIPLE = 16


def _signature(args: tuple, static: dict):
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves), tuple(sorted(static.items()))


def _compiled(fn, args: tuple, static: dict, cache: dict | None = None):
    """(executable of jitted `fn` for these arguments, seconds spent tracing and compiling);
    `cache` keeps executables by argument shapes and static values, so a session's repeated
    asks neither trace nor compile again."""
    key = (fn, *_signature(args, static)) if cache is not None else None
    if key is not None and key in cache:
        return cache[key], 0.0
    t0 = time.perf_counter()
    exe = fn.lower(*args, **static).compile()
    if key is not None:
        cache[key] = exe
    return exe, time.perf_counter() - t0


def _is_ids(x) -> bool:
    return (
        isinstance(x, (Sequence, np.ndarray))
        and not isinstance(x, str)
        and all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in x)
    )


class Session:
    """A context prefilled and compressed once, then asked questions (module doc).

    Args:
      model: a loaded model (`kvjax.load(...)`).
      context: the text (or token ids) the questions are about; a list of texts (or of id
        lists) makes one row per context, each asked its own question.
      policy: the KV-cache policy (a `Policy` or a spec string) that compresses the context.
      max_new_tokens: the longest answer `ask` may generate (>= 1).
      max_question_tokens: the longest question (plus history added with `extend`) the
        state keeps room for (>= 1).
      headroom: decode slots reserved after the context (default: room for the two above,
        rounded up); questions, history and answers all use it.
      implementation: the attention implementation (None: the backend's default).

    Raises TypeError / ValueError for a bad argument, and ValueError for a context that with
    an answer exceeds the model's positions (several passages longer than that together:
    `kvjax.ape`)."""

    def __init__(
        self,
        model,
        context,
        *,
        policy="dense",
        max_new_tokens: int = 64,
        max_question_tokens: int = 256,
        headroom: int | None = None,
        implementation: str | None = None,
    ):
        check_model(model)
        self._setup(model, policy, max_new_tokens, max_question_tokens, headroom, implementation)
        ids = self._context_ids(context)
        cfg = model.config
        longest = max(len(r) for r in ids)
        if longest + self.max_new_tokens > cfg.max_position:
            raise ValueError(
                f"context of {longest} tokens + max_new_tokens={self.max_new_tokens} exceeds the model's "
                f"max_position={cfg.max_position}; shorten it, or encode several passages in parallel at shared "
                "positions with kvjax.ape"
            )
        width = bucket_length(longest)
        toks, lens = pad_rows(ids, cfg.pad_id)
        toks = np.pad(toks, ((0, 0), (0, width - toks.shape[1])), constant_values=cfg.pad_id)
        args = (model.params, jnp.asarray(toks), jnp.asarray(lens))
        static = dict(
            config=cfg,
            policy=self.policy,
            max_new_tokens=self.headroom,
            dtype=model.dtype,
            implementation=implementation,
            longest=bound_length(longest, width),
        )
        exe, compile_s = _compiled(prefill, args, static)
        t0 = time.perf_counter()
        logits, state = jax.block_until_ready(exe(*args))
        self._start(state, logits, prefill_s=time.perf_counter() - t0, compile_s=compile_s, tokens=int(lens.sum()))

    @classmethod
    def from_state(
        cls,
        model,
        state: KVState,
        logits,
        *,
        policy,
        headroom: int,
        max_new_tokens: int = 64,
        implementation: str | None = None,
    ) -> Session:
        """A session over a state some other code prefilled (e.g. `kvjax.eval.shared.apply_policy`
        from a shared dense capture): `logits` [B, V] after each row's last token, `headroom`
        the decode slots the state was built with."""
        check_model(model)
        self = cls.__new__(cls)
        self._setup(model, policy, max_new_tokens, 1, headroom, implementation)
        self._start(state, logits, prefill_s=0.0, compile_s=0.0, tokens=int(np.sum(np.asarray(state.lengths))))
        return self

    # ---- setup ------------------------------------------------------------------------
    def _setup(self, model, policy, max_new_tokens, max_question_tokens, headroom, implementation):
        self.model = model
        self.policy = check_policy(policy)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        check_int("max_question_tokens", max_question_tokens, 1)
        if headroom is None:
            headroom = -(-max_question_tokens // PIECE_MULTIPLE) * PIECE_MULTIPLE + new_tokens_bucket(max_new_tokens)
        self.headroom = check_int("headroom", headroom, 1)
        self.implementation = implementation
        self._closed = False
        self._programs: dict = {}  # compiled feed / decode programs by shapes (`_compiled`)

    def _start(self, state, logits, *, prefill_s, compile_s, tokens):
        self._state, self._logits = state, logits
        self._used = 0  # decode slots taken by `extend` (padded widths)
        self.rows = int(state.lengths.shape[0])
        self._stats = {
            "rows": self.rows,
            "context_tokens": tokens,
            "prefills": 1,
            "prefill_tokens": tokens,
            "prefill_s": prefill_s,
            "prefill_compile_s": compile_s,
            "asks": 0,
            "questions": 0,
            "question_tokens": 0,
            "extended_tokens": 0,
            "append_s": 0.0,
            "decode_s": 0.0,
            "compile_s": compile_s,
            "policy": self.policy.spec(),
            **state.byte_stats(self.model.config),
        }

    def _context_ids(self, context) -> list[list[int]]:
        items = [context] if isinstance(context, str) or _is_ids(context) else context
        if not isinstance(items, (Sequence, np.ndarray)) or len(items) == 0:
            raise TypeError(f"context={context!r} must be a string, a list of token ids, or a list of those (rows)")
        return [self._ids(x, f"context[{i}]" if len(items) > 1 else "context") for i, x in enumerate(items)]

    def _ids(self, x, name: str) -> list[int]:
        if isinstance(x, str):
            ids = self.model.tokenizer.encode(x) if x else []
        elif _is_ids(x):
            ids = [int(i) for i in x]
            vocab = self.model.config.vocab_size
            if any(not 0 <= i < vocab for i in ids):
                raise ValueError(f"{name} holds ids outside the vocabulary [0, {vocab})")
        else:
            raise TypeError(f"{name}={x!r} must be a string or a list of token ids")
        if not ids:
            raise ValueError(f"{name}={x!r} is empty (zero tokens)")
        return ids

    # ---- public -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def state(self) -> KVState:
        """The kept (compressed) state. `kvjax.generation.decode` donates its input: pass a
        copy (`jax.tree.map(jnp.copy, s.state)`) to anything that does."""
        self._check_open()
        return self._state

    @property
    def stats(self) -> dict:
        """rows, context_tokens, prefills (always 1: the context), prefill_tokens (every token
        run through the model before decoding: context, questions, history), prefill_s and
        prefill_compile_s (the context), asks, questions, question_tokens, extended_tokens,
        append_s (questions and history), decode_s, compile_s, policy, and the kept state's
        bytes (`KVState.byte_stats`)."""
        return dict(self._stats)

    def close(self) -> None:
        """Release the kept state; later calls raise RuntimeError."""
        self._state = self._logits = None
        self._programs.clear()
        self._closed = True

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self):
        if self._closed:
            raise RuntimeError("this Session is closed; open a new kvjax.Session(model, context, ...)")

    def _pieces(self, pieces, name: str, allow_broadcast: bool) -> list[list[int]]:
        if self.rows == 1 and (isinstance(pieces, str) or _is_ids(pieces)):
            return [self._ids(pieces, name)]
        if isinstance(pieces, str) or not isinstance(pieces, (Sequence, np.ndarray)) or len(pieces) == 0:
            raise TypeError(f"{name}={pieces!r} must be a string, token ids, or a non-empty list of them")
        out = [self._ids(p, f"{name}[{i}]") for i, p in enumerate(pieces)]
        if len(out) != self.rows and not (allow_broadcast and self.rows == 1):
            raise ValueError(f"{name} has {len(out)} entries for a session of {self.rows} context rows (one per row)")
        return out

    def _width(self, pieces) -> int:
        n = max(len(p) for p in pieces)
        return -(-n // PIECE_MULTIPLE) * PIECE_MULTIPLE if pads_safely(self.policy) else n

    def _run_feed(self, state, pieces, new_turn: bool = False, policy=None):
        cfg = self.model.config
        step = self.policy if policy is None else policy
        toks, lens = pad_rows(pieces, cfg.pad_id, PIECE_MULTIPLE if pads_safely(self.policy) else 1)
        if len(set(lens.tolist())) > 1 and not pads_safely(self.policy):
            raise ValueError(f"policy {self.policy.spec()!r} cannot take padded decode steps; give equal-length pieces")
        start = np.asarray(state.lengths)
        if (start + toks.shape[1] > cfg.max_position).any():
            raise ValueError(f"{toks.shape[1]} more tokens exceed the model's max_position={cfg.max_position}")
        cols = np.arange(toks.shape[1])[None]
        pos = np.where(cols < lens[:, None], start[:, None] + cols, -1).astype(np.int32)
        args = (self.model.params, state, jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(lens - 1, jnp.int32))
        static = dict(
            config=cfg,
            policy=step,
            dtype=self.model.dtype,
            phase="decode",
            chunked=appends_in_chunks(step),
            implementation=self.implementation,
            new_turn=new_turn,  # a question: retrieval policies fetch for it (LayerContext.new_turn)
        )
        exe, compile_s = _compiled(feed, args, static, self._programs)
        t0 = time.perf_counter()
        logits, state = jax.block_until_ready(exe(*args))
        return logits, state, time.perf_counter() - t0, compile_s, int(lens.sum())

    def extend(self, pieces) -> None:
        """Append tokens to the kept state for good (history; one piece per row of a multi-row
        session). The next `ask` without a question answers right after them."""
        self._check_open()
        pieces = self._pieces(pieces, "pieces", allow_broadcast=False)
        w = self._width(pieces)
        if self._used + w + 1 > self.headroom:
            raise ValueError(
                f"extending by {w} tokens leaves no room in the session's headroom of {self.headroom} tokens "
                f"({self._used} used); open the Session with a larger max_question_tokens or headroom"
            )
        logits, state, run_s, compile_s, n = self._run_feed(self._state, pieces)
        self._state, self._logits = state, logits
        self._used += w
        self._stats["extended_tokens"] += n
        self._stats["prefill_tokens"] += n
        self._stats["append_s"] += run_s
        self._stats["compile_s"] += compile_s
        self._stats.update(state.byte_stats(self.model.config))

    def ask(
        self,
        question=None,
        *,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        sampler=None,
        seed: int = 0,
        stop=None,
        stop_ids=None,
    ) -> GenerateOutput:
        """Answer `question` on a copy of the kept state (the state is not changed).

        question: a string (or token ids); a list of them asks them as a batch over the shared
        state (a multi-row session takes one per row); None answers right after the context
        (and any `extend`ed history). The sampling keywords are `kvjax.generate`'s; stop
        strings cut the text after decoding. Returns a `GenerateOutput` (one row per question)
        whose stats are this ask's: questions, prefill_tokens (question tokens appended),
        context_prefill_tokens (0: the context is not prefilled again), append_s, decode_s,
        compile_s, generated_tokens."""
        self._check_open()
        n_new = self.max_new_tokens if max_new_tokens is None else check_int("max_new_tokens", max_new_tokens, 1)
        sampler = check_sampler(sampler, temperature, top_k, top_p)
        stop, stop_ids = check_stop(stop), check_stop_ids(stop_ids)
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed!r} must be an integer in [0, 2**32)")
        tok = self.model.tokenizer
        stops = stop_ids if stop_ids is not None else tuple(tok.eos_ids)
        pieces = None if question is None else self._pieces(question, "question", allow_broadcast=True)
        w = 0 if pieces is None else self._width(pieces)
        if self._used + w + n_new > self.headroom:
            raise ValueError(
                f"a question of {w} tokens and max_new_tokens={n_new} exceed the session's remaining headroom "
                f"of {self.headroom - self._used} tokens; open the Session with larger max_question_tokens / "
                "max_new_tokens"
            )
        seen = int(np.max(np.asarray(self._state.lengths)))
        if seen + w + n_new > self.model.config.max_position:
            raise ValueError(
                f"{seen} tokens seen + a question of {w} + max_new_tokens={n_new} exceed the model's "
                f"max_position={self.model.config.max_position}"
            )
        n_rows = self.rows if pieces is None else len(pieces)
        if pieces is None or pads_safely(self.policy) or len({len(p) for p in pieces}) == 1:
            groups = [list(range(n_rows))]
        else:  # this policy's decode step cannot skip padding: one question at a time
            groups = [[i] for i in range(n_rows)]
        cfg = self.model.config
        width = new_tokens_bucket(n_new)
        out = np.full((n_rows, n_new), cfg.pad_id, np.int32)
        n_out = np.zeros(n_rows, np.int32)
        stats = dict(questions=n_rows, prefill_tokens=0, context_prefill_tokens=0, append_s=0.0, decode_s=0.0)
        stats["compile_s"] = 0.0
        state = None
        shared = self.rows == 1 and shares_kept_state(self.policy, self._state)
        step = SharedPrefix() if shared else self.policy
        for g in groups:
            # `decode` donates its state, and a jitted step may hand an unchanged input leaf back
            # as its output: every path starts from new arrays, so the kept state is never donated.
            if self.rows > 1:
                base = jax.tree.map(jnp.copy, self._state)
            elif shared:  # one copy of the kept state, read by all rows as their shared prefix
                base = shared_prefix_state(jax.tree.map(jnp.copy, self._state), len(g), w + width)
            else:
                base = rows.broadcast_rows(self._state, len(g))
            if pieces is None:
                logits = self._logits if self.rows > 1 else jnp.repeat(self._logits, len(g), axis=0)
            else:
                logits, base, run_s, compile_s, n = self._run_feed(
                    base, [pieces[i] for i in g], new_turn=True, policy=step
                )
                stats["append_s"] += run_s
                stats["compile_s"] += compile_s
                stats["prefill_tokens"] += n
            args = (self.model.params, base, logits, jax.random.key(int(seed)), jnp.int32(n_new))
            static = dict(
                config=cfg,
                policy=step,
                max_new_tokens=width,
                sampler=sampler,
                stop_ids=stops,
                dtype=self.model.dtype,
                implementation=self.implementation,
            )
            exe, compile_s = _compiled(decode, args, static, self._programs)
            del base
            t0 = time.perf_counter()
            o, n, state = jax.block_until_ready(exe(*args))
            stats["decode_s"] += time.perf_counter() - t0
            stats["compile_s"] += compile_s
            out[g] = np.asarray(o)[:, :n_new]
            n_out[g] = np.asarray(n)
        texts = []
        for r in range(n_rows):
            if stop:
                text, n = cut_at_stop(tok, out[r, : n_out[r]].tolist(), stop)
                out[r, n:] = cfg.pad_id
                n_out[r] = n
            else:
                text = tok.decode(out[r, : n_out[r]])
            texts.append(text)
        stats["generated_tokens"] = int(n_out.sum())
        self._stats["asks"] += 1
        self._stats["questions"] += n_rows if pieces is not None else 0
        self._stats["question_tokens"] += stats["prefill_tokens"]
        self._stats["prefill_tokens"] += stats["prefill_tokens"]
        for k in ("append_s", "decode_s", "compile_s"):
            self._stats[k] += stats[k]
        return GenerateOutput(texts, out, n_out, state, stats)


__all__ = ["Session"]
