"""The `kvjax` command line. Each command is a plain function in `run` or `evals`, registered
here in one table."""

from __future__ import annotations

import typer

from . import evals, run

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kvjax: compressed KV caches for JAX LLMs")

COMMANDS = {
    "generate": run.generate,
    "info": run.info,
    "cost": run.cost,
    "policies": run.list_policies_cmd,
    "calibrate": evals.calibrate,
    "eval": evals.eval_cmd,
    "sweep": evals.sweep_cmd,
    "report": evals.report_cmd,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def main():  # pragma: no cover
    app()


__all__ = ["COMMANDS", "app", "main"]
