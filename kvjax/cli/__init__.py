"""The `kvjax` command line. Each command is a plain function in `run` or `evals`, registered
here in one table; every command ends an ordinary mistake (a bad value, a missing file) with
one `error: ...` line on stderr and exit code 2."""

from __future__ import annotations

import typer

from . import evals, run, serve
from .common import user_errors_fail

# rich_markup_mode=None: click's plain help, where boolean options show as flags (--chat /
# --no-chat) rather than with a value placeholder.
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="kvjax: compressed KV caches for JAX LLMs",
)

COMMANDS = {
    "generate": run.generate,
    "info": run.info,
    "cost": run.cost,
    "policies": run.list_policies_cmd,
    "calibrate": evals.calibrate,
    "eval": evals.eval_cmd,
    "sweep": evals.sweep_cmd,
    "report": evals.report_cmd,
    "serve": serve.serve,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(user_errors_fail(_fn))


def _print_version(value: bool):
    if value:
        import jax

        from .. import __version__

        typer.echo(f"kvjax {__version__} (jax {jax.__version__})")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the kvjax and jax versions and exit."
    ),
):
    """kvjax: compressed KV caches for JAX LLMs."""


def main():  # pragma: no cover
    app()


__all__ = ["COMMANDS", "app", "main"]
