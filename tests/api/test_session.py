"""`kvjax.Session`: a context compressed once, asked many questions (question excluded)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, tiny_config

import kvjax
from kvjax.loaders import Model
from kvjax.models import init_params
from kvjax.policies import REGISTRY

CONTEXT = "Anna keeps 7 red boxes. Tom keeps 3 blue jars. The key is under jar 2. "
QUESTIONS = ["\nQ: who keeps boxes?\nA:", "\nQ: where is the key?\nA:", "\nQ: jars?\nA:"]


@pytest.fixture(scope="module")
def model(tiny_model):
    """`tiny_model`'s tokenizer on weights whose greedy outputs vary from prompt to prompt."""
    p = init_params(TINY, jax.random.key(1))
    p = jax.tree_util.tree_map(lambda x: x * 2.0 if x.ndim == 2 else x, p)
    return Model(TINY, p, tiny_model.tokenizer, jnp.float32, "tiny")


def test_dense_session_equals_generate(model):
    """Dense: asking on the kept state is generating from context + question, token for token;
    the batch of questions, one question alone and a repeated ask agree."""
    want = kvjax.generate(model, [CONTEXT + q for q in QUESTIONS], max_new_tokens=10, stop_ids=[])
    with kvjax.Session(model, CONTEXT, max_new_tokens=10, max_question_tokens=32) as s:
        both = s.ask(QUESTIONS, stop_ids=[])
        np.testing.assert_array_equal(both.tokens, want.tokens)
        assert both.texts == want.texts
        again = s.ask(QUESTIONS[1], stop_ids=[])
        np.testing.assert_array_equal(again.tokens[0], want.tokens[1])
        n_q = sum(len(model.tokenizer.encode(q)) for q in QUESTIONS)
        assert both.stats["prefill_tokens"] == n_q and both.stats["context_prefill_tokens"] == 0
        st = s.stats
        assert st["prefills"] == 1 and st["asks"] == 2 and st["questions"] == 4
        assert st["context_tokens"] == len(model.tokenizer.encode(CONTEXT))
        assert int(s.state.lengths[0]) == st["context_tokens"]  # the kept state never saw a question
    assert s.closed


def test_history_and_multi_row_sessions(model):
    """`extend` adds history for good; a session of several contexts asks one question per row."""
    history, q = " Tom moved the key.", "\nQ: key?\nA:"
    want = kvjax.generate(model, [CONTEXT + history + q, CONTEXT + q], max_new_tokens=8, stop_ids=[])
    s = kvjax.Session(model, CONTEXT, max_new_tokens=8, max_question_tokens=48)
    s.extend(history)
    np.testing.assert_array_equal(s.ask(q, stop_ids=[]).tokens[0], want.tokens[0])
    rows = kvjax.Session(model, [CONTEXT + history, CONTEXT], max_new_tokens=8, max_question_tokens=16)
    np.testing.assert_array_equal(rows.ask([q, q], stop_ids=[]).tokens, want.tokens)
    with pytest.raises(ValueError, match="one per row"):
        rows.ask([q])
    # stop strings cut the text as generate's do
    stop = [want.texts[0][3:5]]
    cut = s.ask(q, stop=stop, stop_ids=[])
    ref = kvjax.generate(model, CONTEXT + history + q, max_new_tokens=8, stop=stop, stop_ids=[])
    assert cut.texts == ref.texts and cut.n_tokens.tolist() == ref.n_tokens.tolist()


def _policy_specs():
    out = []
    for name, cls in sorted(REGISTRY.items()):
        params = cls.parameters()
        kw = {k: v for k, v in (("budget", 0.5), ("window", 8)) if k in params}
        if name == "kivi":
            kw = dict(bits=4, group=8, residual=16)
        if name == "quest":  # the one-layer model has no layer after Quest's default two dense ones
            kw["dense_layers"] = 0
        out.append((name, name + (":" + ",".join(f"{k}={v}" for k, v in kw.items()) if kw else "")))
    return out


@pytest.fixture(scope="module")
def one_layer(model):
    """The same weights' first layer alone: every policy's session in a third of the compile time."""
    cfg = tiny_config(num_layers=1)
    p = {"params": {k: v for k, v in model.params["params"].items() if not k.startswith("layers_") or k == "layers_0"}}
    return Model(cfg, p, model.tokenizer, jnp.float32, "tiny-1")


@pytest.mark.parametrize("name,spec", _policy_specs(), ids=[n for n, _ in _policy_specs()])
def test_every_policy_works_in_a_session(name, spec, model, one_layer, request):
    """Each registered policy compresses the context alone (the question excluded), answers a
    batch of questions over it, and leaves the kept state as it was. (Calibrated methods run on
    the three-layer model their test calibrations were made for.)"""
    if "calibration" in REGISTRY[name].parameters():
        paths = request.getfixturevalue("tiny_calibrations")
        spec += ("," if ":" in spec else ":") + f"calibration={paths[name]}"
    else:
        model = one_layer
    with kvjax.Session(model, CONTEXT, policy=spec, max_new_tokens=6, max_question_tokens=32) as s:
        before = jax.tree.map(np.asarray, s.state)
        a = s.ask(QUESTIONS[:2], stop_ids=[])
        assert a.n_tokens.tolist() == [6, 6] and s.stats["prefills"] == 1
        for x, y in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(s.state)):
            np.testing.assert_array_equal(x, np.asarray(y))
        assert int(s.state.lengths[0]) == len(model.tokenizer.encode(CONTEXT))


def test_session_bad_inputs(model):
    s = kvjax.Session(model, CONTEXT, max_new_tokens=4, max_question_tokens=16)
    with pytest.raises(ValueError, match="remaining headroom"):
        s.ask("x" * 40)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        s.ask("hi", max_new_tokens=0)
    with pytest.raises(TypeError, match="question="):
        s.ask(3.5)
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.ask("\nQ: who?")
    with pytest.raises(RuntimeError, match="closed"):
        s.extend(" more")
    with pytest.raises(ValueError, match="kvjax.ape"):
        kvjax.Session(model, "word " * 120, max_new_tokens=16)  # 600 characters > max_position=512
    with pytest.raises(ValueError, match="empty"):
        kvjax.Session(model, "")
    with pytest.raises(TypeError, match="loaded model"):
        kvjax.Session("smollm2", CONTEXT)
    with pytest.raises(ValueError, match="unknown policy"):
        kvjax.Session(model, CONTEXT, policy="nope")


@pytest.mark.slow
def test_questions_cost_one_prefill(smollm2):
    """SmolLM2, a ~1k-token document, 4 questions: one context prefill in a session vs 4
    independent generates (prefill tokens; the same answers). The 16-question timing is
    benchmarks/session_bench.py's (BENCHMARKS.md "Sessions")."""
    from kvjax.eval.texts import load_text

    tok = smollm2.tokenizer
    doc = tok.decode(tok.encode(load_text("kjv-judges"))[:1000])
    questions = [f"\nQuestion {i}: who is named in verse {i + 1}?\nAnswer:" for i in range(4)]
    s = kvjax.Session(smollm2, doc, max_new_tokens=8, max_question_tokens=32)
    answers = [s.ask(q, stop_ids=[]) for q in questions]
    alone = [kvjax.generate(smollm2, doc + q, max_new_tokens=8, stop_ids=[]) for q in questions]
    session_prefill = s.stats["prefill_tokens"]
    independent_prefill = sum(g.stats["prompt_tokens"] for g in alone)
    assert s.stats["prefills"] == 1
    assert session_prefill < independent_prefill / 3
    same = sum(a.texts[0] == g.texts[0] for a, g in zip(answers, alone))
    assert same >= 3  # dense: the same answers (token boundaries between document and question aside)
