"""Every ordinary mistake gets one line that names the value: the Python API raises TypeError or
ValueError at the door (before anything compiles), and the CLI prints `error: ...` on stderr,
exits with code 2 and shows no traceback."""

from __future__ import annotations

import json
import os
import re

import pytest
from typer.testing import CliRunner

import kvjax
from kvjax.cli import app
from kvjax.loaders import ModelFileError
from kvjax.policies import PolicyError, parse_policy
from kvjax.sampling import Sampler

CONV = [{"role": "user", "content": "hi"}]

# (keyword arguments of kvjax.generate beyond the model, exception, text the message must contain)
GENERATE = [
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens=2.5"),
    (dict(max_new_tokens="4"), TypeError, "max_new_tokens='4'"),
    (dict(max_new_tokens=None), TypeError, "max_new_tokens=None"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens=0 must be an integer >= 1"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens=True"),
    (dict(policy=123), TypeError, "policy=123"),
    (dict(policy=None), TypeError, "policy=None"),
    (dict(policy="nonesuch"), ValueError, "unknown policy 'nonesuch'"),
    (dict(policy="kivi:bits=2+kivi:bits=4"), PolicyError, "cannot compose 'kivi' after 'kivi'"),
    (dict(policy="snapkv:budget=0.2,budget=0.3"), ValueError, "budget is given twice"),
    (dict(sampler=0.7), TypeError, "sampler=0.7"),
    (dict(sampler=Sampler(), temperature=0.5), ValueError, "either sampler= or temperature="),
    (dict(temperature=-1.0), ValueError, "temperature=-1.0"),
    (dict(temperature="hot"), TypeError, "temperature='hot'"),
    (dict(top_k=50), ValueError, "top_k=50"),
    (dict(temperature=1.0, top_p=1.5), ValueError, "top_p=1.5"),
    (dict(seed="a"), TypeError, "seed='a'"),
    (dict(seed=-1), ValueError, "seed=-1"),
    (dict(stop_ids=2), TypeError, "stop_ids=2"),
    (dict(stop_ids=[500]), ValueError, "stop_ids: 500 is not a token id of this model (vocabulary size 97)"),
    (dict(stop_ids=[-1]), ValueError, "stop_ids=[-1]"),
    (dict(stop=""), ValueError, "stop=''"),
    (dict(stop=5), TypeError, "stop=5"),
    (dict(prefill_chunk=-8), ValueError, "prefill_chunk=-8"),
    (dict(prefill_chunk=0), ValueError, "prefill_chunk=0"),
    (dict(prefill_chunk=2.0), TypeError, "prefill_chunk=2.0"),
    (dict(chat="yes"), TypeError, "chat='yes'"),
    (dict(on_token=5), TypeError, "on_token=5"),
    (dict(prompts=[]), ValueError, "prompts=[]"),
    (dict(prompts=["ok", 1]), TypeError, "prompts[1]=1"),
    (dict(prompts=""), ValueError, "prompt '' is empty"),
    (dict(prompts="x" * 600), ValueError, "exceeds the model's max_position=512"),
    (dict(prompts=None), ValueError, "got neither"),
    (dict(messages=CONV), ValueError, "not both"),
    (dict(prompts=None, messages="hi"), TypeError, "messages='hi'"),
    (dict(prompts=None, messages=[]), ValueError, "messages=[] is empty"),
    (dict(prompts=None, messages=[{"role": "robot", "content": "x"}]), ValueError, "['role']='robot'"),
    (dict(prompts=None, messages=[{"role": "user", "content": 5}]), TypeError, "['content']=5"),
    (dict(prompts=None, messages=[CONV, ["x"]]), TypeError, "messages[1][0]='x'"),
]


@pytest.mark.parametrize("kw,exc,text", GENERATE, ids=lambda x: repr(x)[:40] if isinstance(x, dict) else "")
def test_generate_checks_its_arguments(tiny_model, kw, exc, text):
    kw = {"prompts": "hello", **kw}
    prompts = kw.pop("prompts")
    with pytest.raises(exc) as info:
        kvjax.generate(tiny_model, prompts, **kw)
    msg = str(info.value)
    assert text in msg and "\n" not in msg, msg
    if "on_token" not in kw:  # stream checks the same arguments when it is called
        with pytest.raises(exc, match=re.escape(text)):
            kvjax.stream(tiny_model, prompts, **kw)


def test_generate_needs_a_loaded_model():
    with pytest.raises(TypeError, match=re.escape("model='smollm2' is a name, not a loaded model; load it first")):
        kvjax.generate("smollm2", "hello")
    with pytest.raises(TypeError, match="kvjax.load"):
        kvjax.generate(object(), "hello")


def test_stream_chunk_steps(tiny_model):
    with pytest.raises(ValueError, match="chunk_steps=0"):
        kvjax.stream(tiny_model, "hello", chunk_steps=0)


@pytest.mark.parametrize(
    "spec,text",
    [
        ("kivi:bits=2+kivi:bits=4", "both store the kept tokens"),
        ("snapkv:budget=0.2+kivi:bits=2+rtn:bits=4", "cannot compose 'rtn' after 'kivi'"),
        ("snapkv:budget=0.2,budget=0.3", "snapkv': budget is given twice in 'snapkv:budget=0.2,budget=0.3'"),
        ("snapkv+", "empty part around '+'"),
        ("snapkv:budget", "expected key=value, got 'budget'"),
        ("snapkv:budget=lots", "budget='lots' is not a valid float"),
        ("snapkv:size=3", "has no parameter 'size'"),
        ("", "is empty"),
    ],
)
def test_spec_parser_refuses(spec, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        parse_policy(spec)


def test_evaluate_checks_context_and_batch_size(tiny_model):
    from kvjax.eval import evaluate

    with pytest.raises((TypeError, ValueError), match=re.escape("context='1024'")):
        evaluate(tiny_model, "passkey", "dense", context="1024")
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate(tiny_model, "passkey", "dense", context=256, batch_size=0)


def test_hf_config_lacking_a_field(tmp_path):
    cfg = {"model_type": "llama", "vocab_size": 97, "num_attention_heads": 2, "num_hidden_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=re.escape("config.json lacks the field 'hidden_size'")):
        kvjax.load(str(tmp_path))
    cfg.update(hidden_size=8, intermediate_size=16, rope_scaling={"rope_type": "llama3", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=re.escape("rope_scaling (llama3 rope) lacks the field 'low_freq_factor'")):
        kvjax.load(str(tmp_path))
    with pytest.raises(TypeError, match="name_or_path=123"):
        kvjax.load(123)


# ---- the CLI ---------------------------------------------------------------------------------

MISSING = os.path.join(os.sep, "no", "such", "model.gguf")

# (arguments, text the one error line must contain); none of them loads a model
CLI = [
    (["generate", "-p", "hi", "-n", "0", "--model", MISSING], "max_new_tokens=0"),
    (["generate", "-p", "", "--model", MISSING], "prompt '' is empty"),
    (["generate", "-p", "hi", "--policy", "nonesuch", "--model", MISSING], "unknown policy 'nonesuch'"),
    (["generate", "-p", "hi", "--policy", "kivi:bits=2+kivi:bits=4", "--model", MISSING], "cannot compose"),
    (["generate", "-p", "hi", "--model", MISSING], f"model not found: {MISSING!r}"),
    (["generate", "-p", "hi", "--temperature", "-1", "--model", MISSING], "temperature=-1.0"),
    (["generate", "-p", "hi", "--top-k", "5", "--model", MISSING], "top_k=5"),
    (["generate", "-p", "hi", "--prefill-chunk", "0", "--model", MISSING], "prefill_chunk=0"),
    (["generate", "-p", "hi", "--stop", "", "--model", MISSING], "stop=['']"),
    (["generate", "-p", "hi", "--seed", "-3", "--model", MISSING], "seed=-3"),
    (["generate", "-p", "hi", "--system", "be brief", "--model", MISSING], "--system needs --chat"),
    (["generate", "-p", "a", "-p", "b", "--stream", "--model", MISSING], "--stream prints one prompt"),
    (["info", "--model", MISSING], f"model not found: {MISSING!r}"),
    (["cost", "--device", "v100"], "unknown device 'v100'"),
    (["cost", "--policy", "nonesuch"], "unknown policy 'nonesuch'"),
    (["cost", "--context", "0"], "context=0"),
    (["cost", "--users", "0"], "users=0"),
    (["cost", "--model", "smollm2-135m"], "context=131072 exceeds smollm2-135m's max_position=8192"),
    (["cost", "--model", MISSING], f"model not found: {MISSING!r}"),
    (["policies", "nonesuch"], "unknown policy 'nonesuch'"),
    (["calibrate", "--method", "kvquant", "--model", MISSING], f"model not found: {MISSING!r}"),
    (["eval", "--task", "nonesuch"], "unknown task 'nonesuch'"),
]


@pytest.mark.parametrize("args,text", CLI, ids=lambda x: " ".join(x)[:50] if isinstance(x, list) else "")
def test_cli_fails_with_one_line(args, text):
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output and r.stdout == "", r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0], r.stderr
