"""generate: prefill + while_loop decode, chunked prefill, sampling, stop tokens, errors, CLI."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from typer.testing import CliRunner

from kvjax.cli import app
from kvjax.generation import bucket_length, decode, generate, prefill
from kvjax.policies import Dense
from kvjax.sampling import Sampler


def _batch(rng, cfg, lengths, width):
    toks = rng.integers(3, cfg.vocab_size, size=(len(lengths), width)).astype(np.int32)
    return jnp.asarray(toks), jnp.asarray(lengths, jnp.int32)


def test_chunked_prefill_equals_one_shot(tiny_config, tiny_params, rng):
    tokens, lengths = _batch(rng, tiny_config, [64, 17, 40], 64)
    kw = dict(config=tiny_config, policy=Dense(), max_new_tokens=4)
    l1, s1 = prefill(tiny_params, tokens, lengths, **kw)
    l2, s2 = prefill(tiny_params, tokens, lengths, prefill_chunk=16, **kw)
    np.testing.assert_allclose(l1, l2, rtol=2e-4, atol=2e-4)
    for a, b in zip(s1.layers, s2.layers):
        np.testing.assert_array_equal(a.pos, b.pos)
        np.testing.assert_allclose(a.k, b.k, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(s1.lengths, lengths)


def test_stop_tokens_and_padding(tiny_config, tiny_params, rng):
    tokens, lengths = _batch(rng, tiny_config, [32, 20], 32)
    kw = dict(config=tiny_config, policy=Dense(), max_new_tokens=8)
    logits, state = prefill(tiny_params, tokens, lengths, **kw)
    copy = lambda s: jax.tree.map(jnp.copy, s)  # decode donates its input state
    free, _, _ = decode(tiny_params, copy(state), logits, jax.random.key(0), sampler=Sampler(), stop_ids=(), **kw)
    stop = int(free[0, 2])  # make row 0's third token a stop token
    out, n, _ = decode(tiny_params, state, logits, jax.random.key(0), sampler=Sampler(), stop_ids=(stop,), **kw)
    out, n = np.asarray(out), np.asarray(n)
    first = int(np.argmax(np.asarray(free[0]) == stop))
    assert n[0] == first + 1 and out[0, first] == stop
    assert np.all(out[0, first + 1 :] == tiny_config.pad_id)
    np.testing.assert_array_equal(out[:, : first + 1], np.asarray(free)[:, : first + 1])


def test_no_recompile_for_new_prompt_contents(tiny_config, tiny_params, rng):
    kw = dict(config=tiny_config, policy=Dense(), max_new_tokens=4)
    tokens, lengths = _batch(rng, tiny_config, [30, 12], 32)
    prefill(tiny_params, tokens, lengths, **kw)
    before = prefill._cache_size()
    tokens2, _ = _batch(rng, tiny_config, [30, 12], 32)
    prefill(tiny_params, tokens2, jnp.asarray([25, 31], jnp.int32), **kw)
    assert prefill._cache_size() == before
    assert bucket_length(30) == bucket_length(17) == 32 and bucket_length(33) == 64


@pytest.mark.parametrize("batch", [1, 2])
def test_decode_loop_updates_the_cache_in_place(tiny_config, tiny_params, batch):
    """No whole-cache copies inside the compiled decode loop (XLA:CPU used to copy every K/V
    buffer 3-4 times per layer per step at batch 1; BENCHMARKS.md "CPU")."""
    kw = dict(config=tiny_config, policy=Dense(), max_new_tokens=8)
    tokens = jnp.ones((batch, 32), jnp.int32)
    logits, state = prefill(tiny_params, tokens, jnp.full((batch,), 32, jnp.int32), **kw)
    txt = (
        decode.lower(tiny_params, state, logits, jax.random.key(0), sampler=Sampler(), stop_ids=(), **kw)
        .compile()
        .as_text()
    )
    shape = "[" + ",".join(map(str, state.layers[0].k.shape)) + "]"
    body, copies = None, []
    for line in txt.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            body = None if line.startswith("ENTRY") else line
        if body is not None and " copy(" in line and shape in line.split("=")[1].split("copy(")[0]:
            copies.append(line.strip()[:120])
    assert copies == [], f"{len(copies)} cache-shaped copies in the decode loop, e.g. {copies[:2]}"


def test_sampling(tiny_config, tiny_params, rng):
    tokens, lengths = _batch(rng, tiny_config, [16], 16)
    kw = dict(config=tiny_config, policy=Dense(), max_new_tokens=12)
    logits, state = prefill(tiny_params, tokens, lengths, **kw)

    def run(sampler, seed):
        return np.asarray(
            decode(
                tiny_params,
                jax.tree.map(jnp.copy, state),
                logits,
                jax.random.key(seed),
                sampler=sampler,
                stop_ids=(),
                **kw,
            )[0]
        )

    greedy = run(Sampler(), 0)
    hot = Sampler(temperature=5.0)
    np.testing.assert_array_equal(run(hot, 1), run(hot, 1))
    assert not np.array_equal(run(hot, 1), run(hot, 2))
    np.testing.assert_array_equal(run(Sampler(temperature=1.0, top_k=1), 3), greedy)
    np.testing.assert_array_equal(run(Sampler(temperature=1.0, top_p=1e-6), 4), greedy)


def test_top_k_top_p_support():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda s: np.asarray(jax.vmap(lambda k: s(logits, k))(keys))[:, 0]
    assert set(draw(Sampler(1.0, top_k=2)).tolist()) == {0, 1}
    assert set(draw(Sampler(1.0, top_p=0.7)).tolist()) == {0, 1}
    assert set(draw(Sampler(1.0, top_p=0.85)).tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
        (dict(top_k=-2), "top_k=-2 must be >= 0"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    ],
)
def test_bad_sampler(kw, match):
    with pytest.raises(ValueError, match=match):
        Sampler(**kw)


@dataclasses.dataclass
class _Tok:
    eos_ids = (2,)

    def encode(self, text):
        return [3 + (ord(c) % 90) for c in text]

    def decode(self, ids, skip_special=True):
        return "".join(chr(i) for i in ids)


@dataclasses.dataclass
class _Model:
    config: object
    params: object
    tokenizer: object = dataclasses.field(default_factory=_Tok)
    dtype: object = jnp.float32


def test_generate_batch_of_ragged_prompts_matches_single(tiny_config, tiny_params):
    m = _Model(tiny_config, tiny_params)
    both = generate(m, ["a longer prompt here", "short"], max_new_tokens=5, stop_ids=())
    one = generate(m, "short", max_new_tokens=5, stop_ids=())
    np.testing.assert_array_equal(both.tokens[1], one.tokens[0])
    assert both.stats["kv_bytes"] > 0 and both.stats["decode_tokens_per_s"] > 0


def test_top_level_api(tiny_config, tiny_params):
    """`kvjax.load`, `kvjax.generate` (a plain function) and `kvjax.stream`; the old module path
    `kvjax.generate.prefill` fails with an ImportError naming kvjax.generation."""
    import kvjax
    from kvjax.loaders import load

    m = _Model(tiny_config, tiny_params)
    out = kvjax.generate(
        m, "short", max_new_tokens=3, stop_ids=(), policy=kvjax.policies.StreamingLLM(budget=0.5, sink=1)
    )
    ref = generate(m, "short", max_new_tokens=3, stop_ids=(), policy="streaming:budget=0.5,sink=1")
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    assert kvjax.load is load and kvjax.generate is generate and callable(kvjax.stream)
    with pytest.raises(ImportError, match="from kvjax.generation import prefill, decode"):
        from kvjax.generate import prefill as _  # noqa: F401


def test_cli_info_and_policies():
    r = CliRunner().invoke(app, ["info", "--model", "llama3.1-8b"])
    assert r.exit_code == 0 and '"kv_bytes_per_token_bf16": 131072' in r.output
    r = CliRunner().invoke(app, ["policies"])
    assert r.exit_code == 0 and "snapkv" in r.output and "budget=0.2" in r.output


@pytest.mark.slow
def test_cli_generate_smollm2_coherent():
    r = CliRunner().invoke(
        app,
        [
            "generate",
            "--prompt",
            "The capital of France is",
            "-n",
            "8",
            "--policy",
            "snapkv:budget=0.5,window=2",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    import json

    out = json.loads(r.output.strip().splitlines()[-1])
    assert "Paris" in out["texts"][0]
    assert out["kv_bytes"] > 0 and out["policy"].startswith("snapkv")
