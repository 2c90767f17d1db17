"""`kvjax generate`, `info`, `cost` and `policies`."""

from __future__ import annotations

import json

import typer

from .common import fail, load_model

MODEL_HELP = "'smollm2', a .gguf file or an HF safetensors directory"


def generate(
    prompt: list[str] = typer.Option(..., "--prompt", "-p", metavar="TEXT", help="prompt text (repeat for a batch)"),
    model: str = typer.Option("smollm2", help=MODEL_HELP),
    policy: str = typer.Option("dense", help="KV-cache policy spec, e.g. 'snapkv:budget=0.2' (see `kvjax policies`)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="most new tokens per prompt"),
    chat: bool = typer.Option(False, "--chat/--no-chat", help="wrap each prompt in the model's chat template"),
    system: str | None = typer.Option(None, metavar="TEXT", help="a system message before each prompt (with --chat)"),
    temperature: float = typer.Option(0.0, help="sampling temperature; 0 decodes greedily"),
    top_k: int = typer.Option(0, "--top-k", help="sample among the k most likely tokens (0: all; needs --temperature)"),
    top_p: float = typer.Option(
        1.0, "--top-p", help="sample from the smallest set of tokens of probability >= p (1: all; needs --temperature)"
    ),
    seed: int = typer.Option(0, help="PRNG seed of sampling"),
    stop: list[str] | None = typer.Option(
        None, "--stop", metavar="TEXT", help="stop a row at this text, cut before it (repeatable)"
    ),
    prefill_chunk: int | None = typer.Option(None, help="prefill the prompt in chunks of this many tokens"),
    stream: bool = typer.Option(False, "--stream/--no-stream", help="print the text as it is generated (one prompt)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
    speculative: str | None = typer.Option(
        None, metavar="SPEC", help="lossless speculative decoding, e.g. 'triforce:budget=256,gamma=6,draft_gamma=4'"
    ),
    draft_model: str | None = typer.Option(
        None, help="with --speculative: a smaller model of the same vocabulary for the StreamingLLM level"
    ),
):
    """Generate text and print it with tokens/s, compile time and KV-cache bytes."""
    from ..generation import generate as run
    from ..generation import stream as run_streaming
    from ..generation.request import check_options, check_prompts

    if system is not None and not chat:
        fail("--system needs --chat (the system message goes into the chat template)")
    if stream and (len(prompt) > 1 or as_json):
        fail("--stream prints one prompt's text as it comes: give one --prompt and no --json")
    options = dict(
        policy=policy,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop=stop or None,
        prefill_chunk=prefill_chunk,
    )
    check_prompts(prompt)  # every mistake the model is not needed for, before loading it
    check_options(chat=chat, **options)
    if speculative is not None:
        from ..generation.speculative import parse_speculative

        if stream:
            fail("--speculative decodes the whole batch at once: drop --stream")
        try:
            parse_speculative(speculative)
        except ValueError as e:
            fail(str(e))
        options["speculative"] = speculative
    elif draft_model is not None:
        fail("--draft-model drafts for --speculative; give --speculative too")
    m = load_model(model)
    if draft_model is not None:
        options["draft_model"] = load_model(draft_model)
    if system is not None:
        inputs = dict(
            messages=[[{"role": "system", "content": system}, {"role": "user", "content": p}] for p in prompt]
        )
    else:
        inputs = dict(prompts=prompt, chat=chat)
    if stream:
        typer.echo(f">>> {prompt[0]}")
        s = run_streaming(m, **inputs, **options)
        for piece in s:
            typer.echo(piece.text, nl=False)
        typer.echo("")
        out = s.output
    else:
        out = run(m, **inputs, **options)
        if not as_json:
            for p, text in zip(prompt, out.texts):
                typer.echo(f"\n>>> {p}\n{text}")
    s = out.stats
    if as_json:
        typer.echo(json.dumps({"texts": out.texts, "n_tokens": out.n_tokens.tolist(), **s}))
        return
    typer.echo(
        f"\n[{s['policy']}] prefill {s['prompt_tokens']} tokens in {s['prefill_s']:.2f} s "
        f"({s['prefill_tokens_per_s']:.1f} tok/s); decode {s['generated_tokens']} tokens in {s['decode_s']:.2f} s "
        f"({s['decode_tokens_per_s']:.1f} tok/s)\n"
        f"compile: {s['compile_s']:.2f} s (prefill {s['prefill_compile_s']:.2f} s, decode {s['decode_compile_s']:.2f} s; "
        "not in the times above)\n"
        f"KV cache: {s['kv_bytes']:,} bytes held, {s['kv_bytes_read_per_step']:,} read per decode step "
        f"(a dense cache of the tokens seen: {s['dense_kv_bytes']:,} bytes)"
    )
    if speculative is not None:
        rates = ", ".join(f"{r:.3f}" for r in s["acceptance_rate"])
        typer.echo(
            f"speculative {s['speculative']}: acceptance per verifying level (target first) [{rates}], "
            f"{s['tokens_per_verify']:.2f} tokens per target forward, {s['target_forwards']} target forwards"
        )


def _config(model: str):
    from ..models.presets import PRESETS

    return PRESETS[model] if model in PRESETS else load_model(model).config


def info(model: str = typer.Option("smollm2", help=MODEL_HELP + " or a preset name (llama3.1-8b, ...)")):
    """Model configuration and KV-cache bytes per token."""
    cfg = _config(model)
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    d["rope_scaling"] = str(cfg.rope_scaling)
    d["parameters"] = cfg.num_params()
    d["kv_bytes_per_token_bf16"] = cfg.kv_bytes_per_token(2)
    d["kv_bytes_per_token_f32"] = cfg.kv_bytes_per_token(4)
    typer.echo(json.dumps(d, indent=2))


def cost(
    model: str = typer.Option("llama3.1-8b", help="a preset name (see `kvjax info`), " + MODEL_HELP),
    policy: list[str] = typer.Option(["dense"], "--policy", help="policy spec (repeat to compare)"),
    context: int = typer.Option(131072, help="tokens per user"),
    device: str = typer.Option("h100", help="h100, h200, a100, l4, t4, tpu-v5e, tpu-v5p"),
    users: int | None = typer.Option(None, help="users decoding together (default: as many as fit)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON list instead of a table"),
):
    """Memory, concurrency, prefill and decode time per policy (Fu 2024's peak analysis). KV
    B/token: bytes the cache holds (memory, concurrency); host B/token: the part of it in host
    memory (ShadowKV, offload); read B/token: bytes one decode step reads of it (the step time,
    with a host-link term for what a step copies from host memory)."""
    from ..analysis import get_device, serving_estimate
    from ..policies import parse_policy

    get_device(device)  # mistakes first, before a model loads
    policies = [parse_policy(p) for p in policy]
    cfg = _config(model)
    rows = [serving_estimate(cfg, p, context, device, users=users) for p in policies]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    typer.echo(f"{cfg.name} on {device}, {context} tokens per user (peak rates x mfu 0.5 / mbu 0.8)")
    typer.echo(
        f"{'policy':36s} {'KV B/token':>10s} {'host B/token':>12s} {'read B/token':>12s} {'max users':>9s} "
        f"{'prefill s':>9s} {'step ms':>8s} {'tok/s':>8s}"
    )
    for spec, r in zip(policy, rows):
        typer.echo(
            f"{spec:36s} {r['kv_bytes_per_token']:10.0f} {r['kv_host_bytes_per_user'] / context:12.0f} "
            f"{r['kv_read_bytes_per_token']:12.0f} {r['max_users']:9d} "
            f"{r['prefill_s']:9.1f} {1000 * r['decode_step_s']:8.1f} {r['decode_tokens_per_s']:8.0f}"
        )


def list_policies_cmd(
    names: list[str] | None = typer.Argument(None, help="policies to show (default: all)"),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="a one-line description and each parameter's default and valid range"
    ),
):
    """Every registered policy with its parameters and defaults."""
    from ..policies import REGISTRY
    from ..policies.registry import describe

    for name in names or sorted(REGISTRY):
        line, params = describe(name)
        if not verbose:
            typer.echo(f"{name:12s} " + ", ".join(f"{k}={v}" for k, (v, _) in params.items()))
            continue
        typer.echo(f"{name}: {line}")
        kw = max((len(k) for k in params), default=0)
        dw = max((len(repr(v)) for v, _ in params.values()), default=0)
        for key, (default, rng) in params.items():
            typer.echo(f"    {key:<{kw}} = {default!r:<{dw}}  {rng}".rstrip())
        if not params:
            typer.echo("    (no parameters)")
