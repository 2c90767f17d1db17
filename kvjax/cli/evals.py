"""`kvjax eval`, `sweep`, `report` and `calibrate`.

Each checks every argument it can before loading a model; a bad one ends the command with one
`error: ...` line on stderr and exit code 2. `eval` exits 1 when its cell fails, `sweep` when
any of its cells failed (the cells that finished are recorded all the same)."""

from __future__ import annotations

import json

import typer

from .common import load_model

MODEL_HELP = "'smollm2', a .gguf file or an HF safetensors directory"
TEXT_HELP = "haystack text: kjv-judges, pydoc or a UTF-8 file"
OPTION_HELP = "task options TASK:key=value,..., e.g. kv_retrieval:pairs=2,turns=2 (repeatable)"


def _failed(message: str):
    """One `error: ...` line and exit code 1: cells that ran and failed (not a bad argument)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    raise typer.Exit(1)


def calibrate(
    method: str = typer.Option(..., help="kvquant, rotatekv, bfp, kv4, a2ats or cskv"),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    text: str = typer.Option("pydoc", help="calibration text: 'pydoc', 'kjv-judges' or a UTF-8 file"),
    tokens: int = typer.Option(1024, help="calibration tokens (at most the model's max_position)"),
    out: str | None = typer.Option(
        None,
        help="artifact directory (default: the user cache, $XDG_CACHE_HOME/kvjax/calibration/METHOD/MODEL, "
        "where the policies look before the artifacts shipped with kvjax)",
    ),
    variant: str = typer.Option(
        "svd", help="cskv only: 'svd' (closed-form optimum) or 'asvd' (the paper's ASVD initialisation)"
    ),
):
    """Calibrate a quantized cache offline (codebooks, channel orders) and save it with orbax;
    prints {method, path, arrays} as JSON. Stages are shown on stderr."""
    from ..eval import load_text
    from ..quant import calibration

    calibration.check_method(method)
    if tokens < 2:
        raise ValueError(f"--tokens {tokens} must be >= 2")
    if variant != "svd" and method != "cskv":
        raise ValueError(f"--variant {variant!r} applies to --method cskv only")
    if method == "cskv" and variant not in ("svd", "asvd"):
        raise ValueError(f"--variant {variant!r} must be 'svd' or 'asvd'")
    haystack = load_text(text)
    m = load_model(model)
    if method == "cskv":
        from ..policies import cskv

        path, shapes = cskv.calibrate(m, haystack, tokens=tokens, out=out, variant=variant)
    else:
        path, shapes = calibration.calibrate(method, m, haystack, tokens=tokens, out=out, progress=True)
    typer.echo(json.dumps({"method": method, "path": path, "arrays": shapes}))


def eval_cmd(
    task: str = typer.Option(..., help="passkey, kv_retrieval, prefix_suffix, qa, majority, mix or ppl"),
    policy: str = typer.Option("dense", help="policy spec, e.g. 'snapkv:budget=0.2'"),
    context: int = typer.Option(4096, help="context length in tokens"),
    trials: int = typer.Option(10, help="episodes (needle depths spread over the context)"),
    seed: int = typer.Option(0, help="seed of the episodes (or of the ppl text window)"),
    text_file: str | None = typer.Option(None, "--text-file", help=TEXT_HELP),
    mode: str = typer.Option(
        "inside", help="'inside': question compressed with the context; 'excluded': appended after"
    ),
    option: list[str] | None = typer.Option(None, help=OPTION_HELP),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    batch_size: int = typer.Option(4, help="episodes per batch"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object (and no progress bar)"),
):
    """Score one policy on one task, as `kvjax sweep` scores the same cell: accuracy (or
    perplexity), KV bytes, compression ratio."""
    from ..eval import commands as c
    from ..eval import evaluate, load_text
    from ..eval import sweep as sw
    from ..eval.sweep import CellFailed
    from ..policies import parse_policy

    pol = parse_policy(policy)
    cells = sw.plan([task], [pol.spec()], [], [context], [seed], [mode] if task != "ppl" else ["inside"])
    options = c.parse_options(option)
    if set(options) - {task}:
        raise ValueError(f"--option names task(s) {sorted(set(options) - {task})}, but --task is {task!r}")
    text = c.text_name(text_file)
    sw.check_plan(cells, {task: trials} if task != "ppl" else None, options, load_text(text), text, batch_size)
    m = load_model(model)
    try:
        r = evaluate(
            m,
            task,
            pol,
            context=context,
            trials=trials,
            seed=seed,
            text=text,
            batch_size=batch_size,
            mode=mode,
            options=options.get(task),
            progress=not as_json,
        )
    except CellFailed as e:
        _failed(str(e))
    if as_json:
        typer.echo(json.dumps(r))
        return
    score = f"ppl {r['ppl']:.3f}" if "ppl" in r else f"accuracy {r['accuracy']:.3f} ({r['correct']}/{r['questions']})"
    typer.echo(
        f"[{r['policy']}] {task} at {context} tokens: {score}; KV {r['kv_bytes']:,.0f} bytes "
        f"(dense {r['dense_kv_bytes']:,.0f}, ratio {r['compression_ratio']:.3f}), "
        f"{r.get('kv_bytes_read', r['kv_bytes']):,.0f} read per decode step"
    )


def sweep_cmd(
    tasks: str = typer.Option("passkey,kv_retrieval,ppl", help="comma-separated tasks"),
    policies: str = typer.Option(..., help="comma-separated policy specs, e.g. dense,snapkv:window=32,tova"),
    budgets: str = typer.Option("0.5,0.2,0.1", help="fractions kept, applied to specs without a budget"),
    context: str = typer.Option("4096", help="comma-separated context lengths"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
    trials: str = typer.Option("passkey=20,kv_retrieval=10", help="N for every task or TASK=N,..."),
    modes: str = typer.Option("inside", help="inside and/or excluded"),
    engines: str = typer.Option("kvjax", help="kvjax and/or kvpress (HF transformers + kvpress on CPU torch)"),
    text_file: str | None = typer.Option(None, "--text-file", help=TEXT_HELP),
    option: list[str] | None = typer.Option(None, help=OPTION_HELP),
    batch_size: int = typer.Option(5, help="episodes per batch (one shared dense prefill per batch)"),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    out: str = typer.Option(..., help="output directory (cells.jsonl, parts.jsonl); rerun to resume"),
    force: bool = typer.Option(
        False, "--force", help="run again the cells --out recorded with other settings, and its failed cells"
    ),
):
    """Every task x policy x budget x context x seed (x mode x engine); resumable JSON lines.
    A cell recorded in --out is reused only when the model, text (by content), trials,
    options, batch size and task version all match; otherwise the sweep stops before running
    anything (or, with --force, runs that cell again). Exit code 1 when any cell failed."""
    from ..eval import commands as c
    from ..eval import load_text
    from ..eval import sweep as sw

    cells = sw.plan(
        c.split_list(tasks, str, "task"),
        c.split_specs(policies),
        c.split_list(budgets, float, "budget"),
        c.split_list(context, int, "context"),
        c.split_list(seeds, int, "seed"),
        c.split_list(modes, str, "mode"),
        c.split_list(engines, str, "engine"),
    )
    n_trials, options, text = c.parse_trials(trials), c.parse_options(option), c.text_name(text_file)
    sw.check_plan(cells, n_trials, options, load_text(text), text, batch_size)
    m = load_model(model)
    hf = None
    if any(x.engine == "kvpress" for x in cells):
        from ..eval.kvpress_bridge import load_hf

        hf = load_hf(model)
    sw.enable_compilation_cache()
    rows = sw.run_sweep(
        m, cells, out, trials=n_trials, text=text, batch_size=batch_size, options=options, hf=hf, force=force
    )
    typer.echo(f"{sw.summary(rows)} in {out}; `kvjax report {out}` renders them")
    bad = [r for r in rows if r.get("status") != "ok"]
    if bad:
        _failed(f"{len(bad)} of {len(rows)} cells failed; first: {sw.Cell.of(bad[0]).key}: {bad[0].get('error', '?')}")


def report_cmd(
    directory: str = typer.Argument(..., help="a sweep output directory (holds cells.jsonl)"),
    out: str | None = typer.Option(None, help="where to write report.md and the PNG plots (default: DIRECTORY)"),
):
    """Markdown tables and PNG plots (score vs compression ratio per task) of a sweep."""
    from ..eval.report import write_report

    typer.echo(write_report(directory, out))
