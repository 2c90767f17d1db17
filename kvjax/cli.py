"""Command line: `kvjax generate`, `kvjax info`, `kvjax policies` (+ commands other modules add)."""

from __future__ import annotations

import json

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kvjax: compressed KV caches for JAX LLMs")


def _model(model: str, dtype: str = "float32"):
    import jax.numpy as jnp

    from .loaders import load

    return load(model, dtype=getattr(jnp, dtype))


@app.command()
def generate(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt text (repeat for a batch)"),
    model: str = typer.Option("smollm2", help="'smollm2', a .gguf file or an HF safetensors directory"),
    policy: str = typer.Option("dense", help="policy spec, e.g. 'snapkv:budget=0.2' (see `kvjax policies`)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    chat: bool = typer.Option(False, help="wrap each prompt in the model's chat template"),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prefill_chunk: int | None = typer.Option(None, help="prefill the prompt in chunks of this many tokens"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
):
    """Generate text and print it with tokens/s and KV-cache bytes."""
    from .generate import generate as run
    from .sampling import Sampler

    m = _model(model)
    out = run(
        m,
        prompt,
        policy=policy,
        max_new_tokens=max_new_tokens,
        chat=chat,
        seed=seed,
        sampler=Sampler(temperature, top_k, top_p),
        prefill_chunk=prefill_chunk,
    )
    if as_json:
        typer.echo(json.dumps({"texts": out.texts, **out.stats}))
        return
    for p, text in zip(prompt, out.texts):
        typer.echo(f"\n>>> {p}\n{text}")
    s = out.stats
    typer.echo(
        f"\n[{s['policy']}] prefill {s['prompt_tokens']} tokens in {s['prefill_s']:.2f}s "
        f"({s['prefill_tokens_per_s']:.1f} tok/s, compile included on first call); "
        f"decode {s['generated_tokens']} tokens in {s['decode_s']:.2f}s ({s['decode_tokens_per_s']:.1f} tok/s)\n"
        f"KV cache: {s['kv_bytes']:,} bytes held (a dense cache of the tokens seen: {s['dense_kv_bytes']:,} bytes)"
    )


@app.command()
def info(model: str = typer.Option("smollm2", help="'smollm2', a .gguf file, an HF directory or a preset name")):
    """Model configuration and KV-cache bytes per token."""
    from .models.presets import PRESETS

    cfg = PRESETS[model] if model in PRESETS else _model(model).config
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    d["rope_scaling"] = str(cfg.rope_scaling)
    d["parameters"] = cfg.num_params()
    d["kv_bytes_per_token_bf16"] = cfg.kv_bytes_per_token(2)
    d["kv_bytes_per_token_f32"] = cfg.kv_bytes_per_token(4)
    typer.echo(json.dumps(d, indent=2))


@app.command()
def cost(
    model: str = typer.Option(
        "llama3.1-8b", help="a preset name (see `kvjax info`), 'smollm2', a .gguf file or HF dir"
    ),
    policy: list[str] = typer.Option(["dense"], "--policy", help="policy spec (repeat to compare)"),
    context: int = typer.Option(131072, help="tokens per user"),
    device: str = typer.Option("h100", help="h100, h200, a100, l4, t4, tpu-v5e, tpu-v5p"),
    users: int | None = typer.Option(None, help="users decoding together (default: as many as fit)"),
    as_json: bool = typer.Option(False, "--json"),
):
    """Memory, concurrency, prefill and decode time per policy (Fu 2024's peak analysis)."""
    from .analysis import serving_estimate
    from .models.presets import PRESETS
    from .policies import parse_policy

    cfg = PRESETS[model] if model in PRESETS else _model(model).config
    rows = [serving_estimate(cfg, parse_policy(p), context, device, users=users) for p in policy]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{cfg.name} on {device}, {context} tokens per user (peak rates x mfu 0.5 / mbu 0.8)")
    typer.echo(f"{'policy':36s} {'KV B/token':>10s} {'max users':>9s} {'prefill s':>9s} {'step ms':>8s} {'tok/s':>8s}")
    for spec, r in zip(policy, rows):
        typer.echo(
            f"{spec:36s} {r['kv_bytes_per_token']:10.0f} {r['max_users']:9d} {r['prefill_s']:9.1f} "
            f"{1000 * r['decode_step_s']:8.1f} {r['decode_tokens_per_s']:8.0f}"
        )


@app.command("policies")
def list_policies_cmd():
    """Every registered policy with its parameters and defaults."""
    from .policies import list_policies

    for name, params in list_policies().items():
        args = ", ".join(f"{k}={v}" for k, v in params.items())
        typer.echo(f"{name:12s} {args}")


@app.command()
def calibrate(
    method: str = typer.Option(..., help="kvquant, rotatekv, bfp or kv4"),
    model: str = typer.Option("smollm2", help="'smollm2', a .gguf file or an HF safetensors directory"),
    text: str = typer.Option("pydoc", help="'pydoc' (Python stdlib text) or a text file"),
    tokens: int = typer.Option(1024, help="calibration tokens"),
    out: str | None = typer.Option(None, help="artifact directory (default: the one shipped in the package)"),
):
    """Calibrate a quantized cache offline (codebooks, channel orders) and save it with orbax."""
    from .eval import load_text
    from .quant.calibration import calibrate as run

    path, shapes = run(method, _model(model), load_text(text), tokens=tokens, out=out)
    typer.echo(json.dumps({"method": method, "path": path, "arrays": shapes}))


def _fail(e: Exception):
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(2)


@app.command("eval")
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
    from .eval import evaluate, load_text
    from .eval.commands import text_name
    from .eval.run import TASK_NAMES
    from .policies import parse_policy

    try:
        if task not in TASK_NAMES:
            raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
        pol = parse_policy(policy)
        text = text_name(text_file)
        load_text(text)
        r = evaluate(
            _model(model),
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
        _fail(e)
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


@app.command("sweep")
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
    from .eval import commands as c
    from .eval import sweep as sw

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
        from .eval import load_text

        load_text(text)
        m = _model(model)
        sw.check_inputs(m, cells, text)
        hf = None
        if any(x.engine == "kvpress" for x in cells):
            from .eval.kvpress_bridge import load_hf

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
        _fail(e)
    bad = sum(r["status"] != "ok" for r in rows)
    typer.echo(f"{len(rows)} cells finished in {out} ({bad} errors); `kvjax report {out}` renders them")


@app.command("report")
def report_cmd(
    directory: str = typer.Argument(..., help="a sweep output directory (holds cells.jsonl)"),
    out: str | None = typer.Option(None, help="where to write report.md and the PNG plots (default: DIRECTORY)"),
):
    """Markdown tables and PNG plots (score vs compression ratio per task) of a sweep."""
    from .eval.report import write_report

    try:
        path = write_report(directory, out)
    except ValueError as e:
        _fail(e)
    typer.echo(path)


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
