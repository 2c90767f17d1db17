"""`kvjax.generate` and `kvjax.stream` as users call them: sampling keywords, stop strings, chat
messages, streaming (the same tokens as one compiled decode), compile time apart from run time,
no recompilation for max_new_tokens +- 1, and the donated decode state."""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.generation import decode, decode_start, decode_steps, new_tokens_bucket, prefill
from kvjax.policies import Dense
from kvjax.sampling import Sampler

PROMPTS = ["The tide comes in and", "Hi"]


def test_sampling_keywords_equal_a_sampler(tiny_model):
    kw = dict(max_new_tokens=12, stop_ids=[])
    a = kvjax.generate(tiny_model, PROMPTS, temperature=0.8, top_k=50, top_p=0.95, seed=1, **kw)
    b = kvjax.generate(tiny_model, PROMPTS, sampler=Sampler(0.8, 50, 0.95), seed=1, **kw)
    c = kvjax.generate(tiny_model, PROMPTS, temperature=0.8, top_k=50, top_p=0.95, seed=2, **kw)
    greedy = kvjax.generate(tiny_model, PROMPTS, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)  # 24 tokens drawn from ~50 candidates each
    assert not np.array_equal(a.tokens, greedy.tokens)


def _first_with(tok, ids, stop: str) -> int:
    """Oracle: the fewest tokens whose text contains `stop` (0 if none)."""
    return next((k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k])), 0)


def test_stop_strings_cut_the_text_and_count_the_tokens(tiny_model):
    tok = tiny_model.tokenizer
    free = kvjax.generate(tiny_model, PROMPTS, max_new_tokens=24, stop_ids=[])
    text = free.texts[0]
    stop, other = text[6:8], text[10:13]  # both occur in row 0; `stop` first
    out = kvjax.generate(tiny_model, PROMPTS, max_new_tokens=24, stop_ids=[], stop=[other, stop])
    assert out.texts[0] == text[: text.find(stop)]
    n = _first_with(tok, list(free.tokens[0]), stop)
    assert out.n_tokens[0] == n
    np.testing.assert_array_equal(out.tokens[0, :n], free.tokens[0, :n])
    assert np.all(out.tokens[0, n:] == tiny_model.config.pad_id)
    for r in range(1, len(PROMPTS)):  # other rows: cut where their own first stop string is (or not at all)
        ids = list(free.tokens[r])
        hits = [i for i in (free.texts[r].find(s) for s in (stop, other)) if i >= 0]
        assert out.texts[r] == free.texts[r][: min(hits)] if hits else free.texts[r]
        k = min((m for m in (_first_with(tok, ids, s) for s in (stop, other)) if m), default=len(ids))
        assert out.n_tokens[r] == k
    assert out.stats["generated_tokens"] == int(out.n_tokens.sum())


def test_chat_messages_use_the_template(tiny_model):
    tok = tiny_model.tokenizer
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    rendered = tok.apply_chat_template(conv)
    assert rendered == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a color.<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    user = tok.apply_chat_template([{"role": "user", "content": "Hi!"}])
    kw = dict(max_new_tokens=6, stop_ids=[])
    out = kvjax.generate(tiny_model, messages=[conv, [{"role": "user", "content": "Hi!"}]], **kw)
    ref = kvjax.generate(tiny_model, [rendered, user], **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    chat = kvjax.generate(tiny_model, [rendered, "Hi!"], chat=True, **kw)  # chat=True wraps plain prompts
    np.testing.assert_array_equal(chat.tokens[1], ref.tokens[1])


@pytest.mark.parametrize("chunk_steps", [1, 3])
def test_stream_yields_the_generated_tokens(tiny_model, chunk_steps):
    """Streaming runs decode_start + decode_steps chunks: the tokens, counts and texts equal one
    compiled `decode`; pieces come in generation order and concatenate to each row's text."""
    kw = dict(max_new_tokens=10, stop_ids=[5, 9], temperature=1.5, seed=3)
    ref = kvjax.generate(tiny_model, PROMPTS, **kw)
    s = kvjax.stream(tiny_model, PROMPTS, chunk_steps=chunk_steps, **kw)
    pieces = list(s)
    np.testing.assert_array_equal(s.output.tokens, ref.tokens)
    np.testing.assert_array_equal(s.output.n_tokens, ref.n_tokens)
    assert s.output.texts == ref.texts
    for r in range(len(PROMPTS)):
        mine = [p for p in pieces if p.row == r]
        assert [p.token_id for p in mine] == list(ref.tokens[r, : ref.n_tokens[r]])
        assert "".join(p.text for p in mine) == ref.texts[r]
    seen = []
    out = kvjax.generate(tiny_model, PROMPTS, on_token=lambda *a: seen.append(a), **kw)
    assert seen == [tuple(p) for p in pieces] and out.texts == ref.texts


def test_stream_with_stop_string(tiny_model):
    free = kvjax.generate(tiny_model, "Hi", max_new_tokens=20, stop_ids=[])
    stop = free.texts[0][4:6]
    s = kvjax.stream(tiny_model, "Hi", max_new_tokens=20, stop_ids=[], stop=stop)
    text = "".join(p.text for p in s)
    assert text == s.output.texts[0] == free.texts[0][: free.texts[0].find(stop)]
    assert s.output.n_tokens[0] == _first_with(tiny_model.tokenizer, list(free.tokens[0]), stop)


@contextlib.contextmanager
def _compilations():
    """Counts jax's traces and XLA compilations inside the block."""
    events = []

    def listen(event, duration, **_):
        if event in ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration"):
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_max_new_tokens_plus_minus_one_does_not_recompile(tiny_model):
    kw = dict(stop_ids=[], policy="streaming:budget=0.5,sink=2")
    first = kvjax.generate(tiny_model, PROMPTS, max_new_tokens=20, **kw)
    assert first.stats["new_tokens_bucket"] == new_tokens_bucket(19) == new_tokens_bucket(21) == 32
    for n in (21, 19):
        with _compilations() as events:
            out = kvjax.generate(tiny_model, PROMPTS, max_new_tokens=n, **kw)
        assert events == [], f"max_new_tokens={n} traced or compiled again: {events}"
        assert out.tokens.shape == (2, n)
        np.testing.assert_array_equal(out.tokens[:, :19], first.tokens[:, :19])


def test_stats_report_compile_apart_from_run(tiny_model):
    out = kvjax.generate(tiny_model, "A new shape of prompt for this test only!", max_new_tokens=70, stop_ids=[])
    s = out.stats
    for key in ("prefill_s", "decode_s", "prefill_compile_s", "decode_compile_s"):
        assert s[key] > 0, key
    assert s["compile_s"] == pytest.approx(s["prefill_compile_s"] + s["decode_compile_s"])
    assert s["decode_tokens_per_s"] == pytest.approx((s["generated_tokens"] - 1) / s["decode_s"])


def _donated_args(lowered) -> int:
    text = lowered.as_text()
    return text.count("tf.aliasing_output") + text.count("jax.buffer_donor")


def test_decode_donates_its_input_state(tiny_config, tiny_params):
    kw = dict(config=tiny_config, policy=Dense(), max_new_tokens=4)
    tokens, lengths = jnp.ones((2, 32), jnp.int32), jnp.asarray([32, 7], jnp.int32)
    logits, state = prefill(tiny_params, tokens, lengths, **kw)
    n_state = len(jax.tree.leaves(state))
    dec = dict(sampler=Sampler(), stop_ids=(), **kw)
    # every state leaf is marked donated in the lowered program (what a GPU/TPU backend aliases)
    assert _donated_args(decode.lower(tiny_params, state, logits, jax.random.key(0), **dec)) == n_state
    start = dict(config=tiny_config, max_new_tokens=4, sampler=Sampler(), stop_ids=())
    assert _donated_args(decode_start.lower(state, logits, jax.random.key(0), **start)) == n_state
    loop = jax.eval_shape(lambda s, lg: decode_start(s, lg, jax.random.key(0), **start), state, logits)
    steps = dict(config=tiny_config, policy=Dense(), sampler=Sampler(), stop_ids=())
    assert _donated_args(decode_steps.lower(tiny_params, loop, jnp.int32(3), **steps)) == len(jax.tree.leaves(loop))
    out, _, new_state = decode(tiny_params, state, logits, jax.random.key(0), **dec)
    # the backend (XLA:CPU donates too) took the buffers: the caller's state is gone, the cache exists once
    assert all(x.is_deleted() for x in jax.tree.leaves(state))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new_state)) and out.shape == (2, 4)


@pytest.mark.parametrize("fn", [kvjax.generate, kvjax.stream], ids=lambda f: f.__name__)
def test_help_documents_every_parameter(fn):
    import inspect

    doc = inspect.getdoc(fn)
    own = inspect.getdoc(kvjax.generate)
    for name in inspect.signature(fn).parameters:
        assert re.search(rf"^\s*{name}: ", own, re.M) or re.search(rf"\b{name}: ", doc), f"{name} is not documented"
