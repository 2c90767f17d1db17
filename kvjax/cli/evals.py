"""`kvjax eval`, `sweep`, `report` and `calibrate`."""

from __future__ import annotations

import json

import typer

from .common import fail, load_model


def calibrate(
    method: str = typer.Option(..., help="kvquant, rotatekv, bfp or kv4"),
    model: str = typer.Option("smollm2", help="'smollm2', a .gguf file or an HF safetensors directory"),
    text: str = typer.Option("pydoc", help="'pydoc' (Python stdlib text) or a text file"),
    tokens: int = typer.Option(1024, help="calibration tokens"),
    out: str | None = typer.Option(None, help="artifact directory (default: the one shipped in the package)"),
):
    """Calibrate a quantized cache offline (codebooks, channel orders) and save it with orbax."""
    from ..eval import load_text
    from ..quant.calibration import calibrate as run

    path, shapes = run(method, load_model(model), load_text(text), tokens=tokens, out=out)
    typer.echo(json.dumps({"method": method, "path": path, "arrays": shapes}))


def eval_cmd(
    task: str = typer.Option(..., help="passkey, kv_retrieval, ppl, prefix_suffix, qa, majority or mix"),
    policy: str = typer.Option("dense", help="policy spec, e.g. 'snapkv:budget=0.2'"),
    context: int = typer.Option(4096, help="context length in tokens"),
    trials: int = typer.Option(10, help="samples (needle depths spread over the context)"),
    seed: int = 0,
    text_file: str | None = typer.Option(None, "--text-file", help="haystack text: kjv-judges, pydoc or a file"),
    mode: str = typer.Option(
        "inside", help="'inside': question compressed with the context; 'excluded': appended after"
    ),
    model: str = typer.Option("smollm2", help="'smollm2', a .gguf file or an HF safetensors directory"),
    batch_size: int = typer.Option(4, help="prompts per batch"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
):
    """Score one policy on one task: accuracy (or ppl), KV bytes, compression ratio."""
    from ..eval import evaluate, load_text
    from ..eval.commands import text_name
    from ..eval.run import TASK_NAMES
    from ..policies import parse_policy

    try:
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
        pol = parse_policy(policy)
        text = text_name(text_file)
        load_text(text)
        r = evaluate(
            load_model(model),
            task,
            pol,
            context=context,
            trials=trials,
            seed=seed,
            text=text,
            batch_size=batch_size,
            mode=mode,
        )
    except ValueError as e:
        fail(e)
    if as_json:
        typer.echo(json.dumps(r))
        return
    score = (
        f"ppl {r['ppl']:.3f}"
        if "ppl" in r
        else f"accuracy {r['accuracy']:.3f} ({r['correct']}/{r.get('questions', r['trials'])})"
    )
    typer.echo(
        f"[{r['policy']}] {task} at {context} tokens: {score}; KV {r['kv_bytes']:,.0f} bytes "
        f"(dense {r['dense_kv_bytes']:,.0f}, ratio {r['compression_ratio']:.3f})"
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
    text_file: str | None = typer.Option(None, "--text-file", help="haystack text: kjv-judges, pydoc or a file"),
    option: list[str] | None = typer.Option(None, help="task options, e.g. kv_retrieval:pairs=2,turns=2"),
    batch_size: int = typer.Option(5, help="episodes per batch (one shared dense prefill per batch)"),
    model: str = typer.Option("smollm2", help="'smollm2', a .gguf file or an HF safetensors directory"),
    out: str = typer.Option(..., help="output directory (cells.jsonl, parts.jsonl); rerun to resume"),
):
    """Every task x policy x budget x context x seed (x mode x engine); resumable JSON lines."""
    from ..eval import commands as c
    from ..eval import sweep as sw

    try:
        cells = sw.plan(
            c.split_list(tasks, str, "task"),
            c.split_specs(policies),
            c.split_list(budgets, float, "budget"),
            c.split_list(context, int, "context"),
            c.split_list(seeds, int, "seed"),
            c.split_list(modes, str, "mode"),
            c.split_list(engines, str, "engine"),
        )
        text = c.text_name(text_file)
        from ..eval import load_text

        load_text(text)
        m = load_model(model)
        sw.check_inputs(m, cells, text)
        hf = None
        if any(x.engine == "kvpress" for x in cells):
            from ..eval.kvpress_bridge import load_hf

            hf = load_hf(model)
        sw.enable_compilation_cache()
        rows = sw.run_sweep(
            m,
            cells,
            out,
            trials=c.parse_trials(trials),
            text=text,
            batch_size=batch_size,
            options=c.parse_options(option),
            hf=hf,
        )
    except ValueError as e:
        fail(e)
    bad = sum(r["status"] != "ok" for r in rows)
    typer.echo(f"{len(rows)} cells finished in {out} ({bad} errors); `kvjax report {out}` renders them")


def report_cmd(
    directory: str = typer.Argument(..., help="a sweep output directory (holds cells.jsonl)"),
    out: str | None = typer.Option(None, help="where to write report.md and the PNG plots (default: DIRECTORY)"),
):
    """Markdown tables and PNG plots (score vs compression ratio per task) of a sweep."""
    from ..eval.report import write_report

    try:
        path = write_report(directory, out)
    except ValueError as e:
        fail(e)
    typer.echo(path)
