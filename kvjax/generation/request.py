"""Checking and tokenizing a generation request before anything is compiled.

`check_options` validates every argument that needs no model (the CLI calls it before it
loads one); `build_request` adds the model-dependent checks and tokenizes the prompts or
chat messages. Errors name the argument and its value: TypeError for a value of the wrong
kind, ValueError for a value out of range.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ..policies.base import Policy
from ..policies.registry import parse_policy
from ..sampling import Sampler
from .steps import bucket_length, new_tokens_bucket

#: Roles a chat message may have (the roles of the chat templates kvjax reads).
ROLES = ("system", "user", "assistant", "tool")


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_int(name: str, value, minimum: int, *, none_means: str | None = None):
    """`value` as an int >= minimum (None allowed when `none_means` says what it means)."""
    if value is None and none_means is not None:
        return None
    what = f"an integer >= {minimum}" + (f" or None ({none_means})" if none_means else "")
    if not _is_int(value):
        raise TypeError(f"{name}={value!r} must be {what}")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be {what}")
    return int(value)


def check_policy(policy) -> Policy:
    """A Policy object, or one built from a spec string."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        return parse_policy(policy)
    raise TypeError(f"policy={policy!r} must be a Policy or a spec string such as 'dense' or 'snapkv:budget=0.2'")


def check_sampler(sampler, temperature, top_k, top_p) -> Sampler:
    """A Sampler from either `sampler=` or the temperature / top_k / top_p keywords."""
    given = {k: v for k, v in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)) if v is not None}
    if sampler is not None:
        if not isinstance(sampler, Sampler):
            raise TypeError(
                f"sampler={sampler!r} must be a kvjax.sampling.Sampler; for a temperature pass temperature= instead"
            )
        if given:
            raise ValueError(f"pass either sampler= or {', '.join(f'{k}=' for k in given)}, not both")
        return sampler
    return Sampler(**given)


def check_stop_ids(stop_ids) -> tuple[int, ...] | None:
    """Token ids: None (the tokenizer's end-of-sequence ids) or a sequence of ints >= 0."""
    if stop_ids is None:
        return None
    if isinstance(stop_ids, (str, bytes)) or not isinstance(stop_ids, (Sequence, np.ndarray)):
        raise TypeError(f"stop_ids={stop_ids!r} must be a list of token ids, e.g. stop_ids=[{stop_ids!r}]")
    out = []
    for i in list(stop_ids):
        if not _is_int(i) or i < 0:
            raise ValueError(f"stop_ids={stop_ids!r}: {i!r} is not a token id (an integer >= 0)")
        out.append(int(i))
    return tuple(out)


def check_stop(stop) -> tuple[str, ...]:
    """Stop strings: None, one string, or a sequence of non-empty strings."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise TypeError(f"stop={stop!r} must be a string or a list of strings")
    if any(s == "" for s in items):
        raise ValueError(f"stop={stop!r}: a stop string must not be empty")
    return tuple(dict.fromkeys(items))


def check_messages(messages) -> list[list[dict]]:
    """Chat messages: one conversation [{'role', 'content'}, ...] or a batch of them."""
    if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or isinstance(messages, str):
        raise TypeError(f"messages={messages!r} must be a list of {{'role': ..., 'content': ...}} dicts")
    if not messages:
        raise ValueError("messages=[] is empty; give at least one {'role': 'user', 'content': ...} message")
    batch = [messages] if isinstance(messages[0], Mapping) else list(messages)
    for b, conv in enumerate(batch):
        where = f"messages[{b}]" if len(batch) > 1 or not isinstance(messages[0], Mapping) else "messages"
        if isinstance(conv, (str, Mapping)) or not isinstance(conv, Sequence) or not conv:
            raise TypeError(f"{where}={conv!r} must be a non-empty list of {{'role': ..., 'content': ...}} dicts")
        for i, m in enumerate(conv):
            if not isinstance(m, Mapping):
                raise TypeError(f"{where}[{i}]={m!r} must be a dict with 'role' and 'content'")
            role, content = m.get("role"), m.get("content")
            if role not in ROLES:
                raise ValueError(f"{where}[{i}]['role']={role!r}; expected one of {ROLES}")
            if not isinstance(content, str):
                raise TypeError(f"{where}[{i}]['content']={content!r} must be a string")
    return [[dict(m) for m in conv] for conv in batch]


def check_prompts(prompts) -> list[str]:
    """Plain prompts: one non-empty string or a non-empty list of them."""
    if isinstance(prompts, str):
        if not prompts:
            raise ValueError("prompt '' is empty")
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts={prompts!r} must be a string or a list of strings")
    if not prompts:
        raise ValueError("no prompts given (prompts=[])")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}]={p!r} must be a string")
        if not p:
            raise ValueError(f"prompt '' is empty (prompts[{i}])")
    return list(prompts)


@dataclasses.dataclass(frozen=True)
class Options:
    """The model-independent arguments of a generation call, checked."""

    policy: Policy
    max_new_tokens: int
    sampler: Sampler
    seed: int
    stop: tuple[str, ...]
    stop_ids: tuple[int, ...] | None
    prefill_chunk: int | None
    chat: bool
    on_token: Callable | None

    @property
    def new_tokens_bucket(self) -> int:
        return new_tokens_bucket(self.max_new_tokens)


def check_options(
    *,
    policy="dense",
    max_new_tokens=64,
    sampler=None,
    temperature=None,
    top_k=None,
    top_p=None,
    seed=0,
    stop=None,
    stop_ids=None,
    prefill_chunk=None,
    chat=False,
    on_token=None,
) -> Options:
    """Check every argument of `generate` that needs no model (see module doc)."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise (ValueError if _is_int(seed) else TypeError)(f"seed={seed!r} must be an integer in [0, 2**32)")
    prefill_chunk = check_int("prefill_chunk", prefill_chunk, 1, none_means="no chunking")
    if not isinstance(chat, bool):
        raise TypeError(f"chat={chat!r} must be True or False")
    if on_token is not None and not callable(on_token):
        raise TypeError(f"on_token={on_token!r} must be a callable (row, token_id, text) or None")
    return Options(
        policy=check_policy(policy),
        max_new_tokens=max_new_tokens,
        sampler=check_sampler(sampler, temperature, top_k, top_p),
        seed=int(seed),
        stop=check_stop(stop),
        stop_ids=check_stop_ids(stop_ids),
        prefill_chunk=prefill_chunk,
        chat=chat,
        on_token=on_token,
    )


def check_model(model) -> None:
    if isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model={model!r} is a name, not a loaded model; load it first: model = kvjax.load({str(model)!r})"
        )
    missing = [a for a in ("config", "params", "tokenizer") if not hasattr(model, a)]
    if missing:
        raise TypeError(
            f"model={type(model).__name__!s} object is not a loaded model (it has no {', '.join(missing)}); "
            "load one with kvjax.load(...)"
        )


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked, tokenized request: `ids` per row, the bucketed prompt `width`, the stop ids."""

    options: Options
    ids: list[list[int]]
    width: int
    stop_ids: tuple[int, ...]
    labels: list[str]  # what each row was asked (the prompt, or the last message's content)


def _encode(tokenizer, text: str, label: str) -> list[int]:
    ids = tokenizer.encode(text)
    if not ids:
        raise ValueError(f"prompt {label!r} encodes to zero tokens")
    return ids


def build_request(model, prompts=None, messages=None, *, options: Options) -> Request:
    """Tokenize `prompts` (plain, or wrapped in the chat template when options.chat) or chat
    `messages`; check lengths against the model (see module doc)."""
    check_model(model)
    tok = model.tokenizer
    if (prompts is None) == (messages is None):
        raise ValueError(
            "pass prompts (a string or a list of strings) or messages=[{'role': 'user', 'content': ...}], "
            + ("not both" if prompts is not None else "got neither")
        )
    if messages is not None:
        convs = check_messages(messages)
        labels = [conv[-1]["content"] for conv in convs]
        ids = [_encode(tok, tok.apply_chat_template(conv), label) for conv, label in zip(convs, labels)]
    else:
        labels = check_prompts(prompts)
        texts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in labels] if options.chat else labels
        ids = [_encode(tok, t, p) for t, p in zip(texts, labels)]
    longest = max(len(t) for t in ids)
    limit = model.config.max_position
    if longest + options.max_new_tokens > limit:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={options.max_new_tokens} exceeds the model's "
            f"max_position={limit}"
        )
    vocab = model.config.vocab_size
    for i in options.stop_ids or ():
        if i >= vocab:
            raise ValueError(f"stop_ids: {i} is not a token id of this model (vocabulary size {vocab})")
    stops = options.stop_ids if options.stop_ids is not None else tuple(tok.eos_ids)
    width = bucket_length(longest, multiple=options.prefill_chunk)
    return Request(options, ids, width, stops, labels)


def prepare_request(model, prompts, policy, max_new_tokens: int, chat: bool, bucket_multiple: int | None = None):
    """Check and tokenize plain prompts: (policy object, token id lists, bucketed width).
    (The entry point of `kvjax.parallel.generate`.)"""
    opts = check_options(policy=policy, max_new_tokens=max_new_tokens, chat=chat, prefill_chunk=bucket_multiple)
    req = build_request(model, prompts, options=opts)
    return opts.policy, req.ids, req.width
