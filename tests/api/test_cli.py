"""The command line: --version, flags shown as flags, `kvjax policies --verbose` with every
parameter's range (checked against the policy constructors), and `kvjax generate` end to end on
the tiny model (stop strings, streaming, chat, compile time on its own line)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import tomllib
from typer.testing import CliRunner

import kvjax
from kvjax.cli import COMMANDS, app
from kvjax.policies import REGISTRY, PolicyError
from kvjax.policies.registry import RANGES, Range, describe

ROOT = Path(__file__).resolve().parents[2]


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert r.exit_code == 0 and r.stdout.startswith(f"kvjax {declared} (jax ") and kvjax.__version__ == declared


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_flags_as_flags(command):
    r = CliRunner().invoke(app, [command, "--help"])
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output and "BOOLEAN" not in r.output, r.output


def test_generate_help_explains_sampling():
    out = " ".join(CliRunner().invoke(app, ["generate", "--help"]).output.split())
    for text in (
        "--chat / --no-chat",
        "--temperature <float> sampling temperature; 0 decodes greedily",
        "--top-k",
        "--top-p",
    ):
        assert text in out, text
    assert "--stop TEXT stop a row at this text" in out and "--stream / --no-stream" in out


def test_policies_verbose_describes_every_parameter():
    r = CliRunner().invoke(app, ["policies", "--verbose"])
    assert r.exit_code == 0
    out = " ".join(r.stdout.split())
    assert "snapkv: SnapKV: keep what the last queries of the prompt attend to." in out
    assert "budget = 0.2 (0, 1]; fraction of the prompt kept" in out
    assert "bits = 2 one of 2, 3, 4, 8" in out
    one = CliRunner().invoke(app, ["policies", "kivi", "-v"]).stdout
    assert one.startswith("kivi: ") and "layout = 'auto'" in " ".join(one.split()) and "snapkv" not in one


def _probe(cls, key: str, value) -> bool:
    """True if the constructor accepts `key=value` (the other parameters at their defaults)."""
    try:
        cls(**{key: value})
    except PolicyError:
        return False
    return True


def _inside(rng: Range, x) -> bool:
    lo = rng.low is None or (x > rng.low if rng.low_open else x >= rng.low)
    hi = rng.high is None or (x < rng.high if rng.high_open else x <= rng.high)
    return lo and hi


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_ranges_match_the_constructors(name):
    """Every parameter has a range; its default lies inside; the constructor accepts the range's
    closed ends and choices and refuses just outside the ends and an unlisted choice."""
    cls = REGISTRY[name]
    line, params = describe(name)
    assert line and "\n" not in line
    assert set(RANGES[name]) == set(cls.parameters()), f"{name}: ranges for {sorted(RANGES[name])}"
    for key, (default, rng) in params.items():
        kind = type(default)
        if rng.choices:
            assert default in rng.choices, (name, key)
            assert all(_probe(cls, key, c) for c in rng.choices), (name, key)
            outside = {bool: None, int: 7, str: "nonesuch"}[kind] if kind is not bool else None
            if outside is not None and outside not in rng.choices:
                assert not _probe(cls, key, outside), (name, key, outside)
            continue
        if rng.low is None and rng.high is None:  # a condition on other values only (a note)
            assert rng.note, (name, key)
            continue
        assert _inside(rng, default), (name, key, default)
        step = 1 if kind is int else 1e-6
        for end, is_open, sign in ((rng.low, rng.low_open, -1), (rng.high, rng.high_open, +1)):
            if end is None:
                continue
            end = kind(end) if kind is int or not math.isinf(end) else end
            if is_open:
                assert not _probe(cls, key, end), (name, key, end)
                assert _probe(cls, key, end - sign * step), (name, key, end - sign * step)
            else:
                assert _probe(cls, key, end), (name, key, end)
                assert not _probe(cls, key, end + sign * step), (name, key, end + sign * step)


@pytest.fixture
def cli_model(tiny_model, monkeypatch):
    """`--model tiny` loads the tiny model (no file) in `kvjax generate`."""
    import kvjax.cli.run as run

    monkeypatch.setattr(run, "load_model", lambda name: tiny_model)
    return tiny_model


def test_generate_json_with_stops(cli_model):
    free = kvjax.generate(cli_model, ["Hello", "Sea"], max_new_tokens=12, stop_ids=[])
    stop = free.texts[0][3:5]
    args = ["generate", "-p", "Hello", "-p", "Sea", "-n", "12", "--stop", stop, "--stop", "@@@", "--json"]
    r = CliRunner().invoke(app, args)
    # CLI stop ids are the tokenizer's eos ids (2): compare with the same call in Python
    ref = kvjax.generate(cli_model, ["Hello", "Sea"], max_new_tokens=12, stop=[stop, "@@@"])
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["texts"] == ref.texts and out["n_tokens"] == ref.n_tokens.tolist()
    assert {"compile_s", "prefill_compile_s", "decode_compile_s", "prefill_s", "decode_s"} <= set(out)


def test_generate_text_stream_and_chat(cli_model):
    r = CliRunner().invoke(app, ["generate", "-p", "Hello", "-n", "6", "--stream", "--chat", "--system", "Be kind."])
    assert r.exit_code == 0, r.output
    ref = kvjax.generate(
        cli_model,
        messages=[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}],
        max_new_tokens=6,
    )
    lines = r.stdout.splitlines()
    assert lines[0] == ">>> Hello" and r.stdout.startswith(f">>> Hello\n{ref.texts[0]}\n")
    compile_line = next(line for line in lines if line.startswith("compile: "))
    assert "not in the times above" in compile_line


def test_every_command_is_wrapped_for_user_errors():
    """A command's ValueError becomes one line and exit code 2 (the table in test_bad_inputs
    covers the messages); other exceptions keep their traceback."""
    for cmd in app.registered_commands:
        assert getattr(cmd.callback, "__wrapped__", None) in COMMANDS.values(), cmd.name
    assert dataclasses.is_dataclass(Range)
