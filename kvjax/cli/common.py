"""Helpers every command shares: loading the model, failing with one line."""

from __future__ import annotations

import functools

import typer

#: What a user's mistake raises: bad values (ValueError, which includes PolicyError and
#: ModelFileError) and missing or unreadable files (OSError). Anything else is a bug and keeps
#: its traceback.
USER_ERRORS = (ValueError, OSError)


def load_model(model: str, dtype: str = "float32"):
    import jax.numpy as jnp

    from ..loaders import load

    return load(model, dtype=getattr(jnp, dtype))


def fail(e: Exception | str):
    """Print `error: ...` (one line) on stderr and exit with code 2 (no traceback)."""
    text = " ".join(str(e).split()) or type(e).__name__
    typer.echo(f"error: {text}", err=True)
    raise typer.Exit(2)


def user_errors_fail(fn):
    """Wrap a command so that USER_ERRORS end it with `fail` (one line, exit code 2)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            fail(e)

    return run
