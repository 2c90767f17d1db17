"""Command line: `kvjax generate`, `kvjax info`, `kvjax policies` (+ commands other modules add)."""

from __future__ import annotations

import json
import os
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="kvjax: compressed KV caches for JAX LLMs")


def _model(model: str, dtype: str = "float32"):
    import jax.numpy as jnp

    from .loaders import load

    return load(model, dtype=getattr(jnp, dtype))


@app.command()
def generate(
    prompt: List[str] = typer.Option(..., "--prompt", "-p", help="prompt text (repeat for a batch)"),
    model: str = typer.Option("smollm2", help="'smollm2', a .gguf file or an HF safetensors directory"),
    policy: str = typer.Option("dense", help="policy spec, e.g. 'snapkv:budget=0.2' (see `kvjax policies`)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n"),
    chat: bool = typer.Option(False, help="wrap each prompt in the model's chat template"),
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    prefill_chunk: Optional[int] = typer.Option(None, help="prefill the prompt in chunks of this many tokens"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of text"),
):
    """Generate text and print it with tokens/s and KV-cache bytes."""
    from .generate import generate as run
    from .sampling import Sampler

    m = _model(model)
    out = run(m, prompt, policy=policy, max_new_tokens=max_new_tokens, chat=chat, seed=seed,
              sampler=Sampler(temperature, top_k, top_p), prefill_chunk=prefill_chunk)
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
    out: Optional[str] = typer.Option(None, help="artifact directory (default: the one shipped in the package)"),
):
    """Calibrate a quantized cache offline (codebooks, channel orders) and save it with orbax."""
    from .eval import load_text
    from .quant.calibration import calibrate as run

    path, shapes = run(method, _model(model), load_text(text), tokens=tokens, out=out)
    typer.echo(json.dumps({"method": method, "path": path, "arrays": shapes}))


def main():  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
