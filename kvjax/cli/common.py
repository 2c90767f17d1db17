"""Helpers every command shares: loading the model, failing with one line."""

from __future__ import annotations

import typer


def load_model(model: str, dtype: str = "float32"):
    import jax.numpy as jnp

    from ..loaders import load

    return load(model, dtype=getattr(jnp, dtype))


def fail(e: Exception):
    """Print `error: ...` on stderr and exit with code 2 (no traceback)."""
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)
