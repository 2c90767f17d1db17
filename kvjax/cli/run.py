"""`kvjax generate`, `info`, `cost` and `policies`."""

from __future__ import annotations

import json

import typer

from .common import load_model


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
    from ..generate import generate as run
    from ..sampling import Sampler

    m = load_model(model)
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


def info(model: str = typer.Option("smollm2", help="'smollm2', a .gguf file, an HF directory or a preset name")):
    """Model configuration and KV-cache bytes per token."""
    from ..models.presets import PRESETS

    cfg = PRESETS[model] if model in PRESETS else load_model(model).config
    d = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    d["rope_scaling"] = str(cfg.rope_scaling)
    d["parameters"] = cfg.num_params()
    d["kv_bytes_per_token_bf16"] = cfg.kv_bytes_per_token(2)
    d["kv_bytes_per_token_f32"] = cfg.kv_bytes_per_token(4)
    typer.echo(json.dumps(d, indent=2))


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
    from ..analysis import serving_estimate
    from ..models.presets import PRESETS
    from ..policies import parse_policy

    cfg = PRESETS[model] if model in PRESETS else load_model(model).config
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


def list_policies_cmd():
    """Every registered policy with its parameters and defaults."""
    from ..policies import list_policies

    for name, params in list_policies().items():
        args = ", ".join(f"{k}={v}" for k, v in params.items())
        typer.echo(f"{name:12s} {args}")
