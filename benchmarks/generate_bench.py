"""Generation speed: kvjax vs HF transformers.

  --device cpu : SmolLM2-135M (the real weights), prefill 2k tokens then decode 128, batch 1,
                 kvjax (jit; decode reading the GGUF's quantized blocks with the native kernel,
                 and reading float32 weights) vs HF transformers (torch CPU, sdpa,
                 DynamicCache; float32 weights dequantized from the same GGUF).
  --device gpu : Llama-3.1-8B-shaped random bf16 weights, 8k and 32k context, batch 1 and 8:
                 per-step decode time against the memory roofline (weight bytes + KV bytes
                 read per step over the measured HBM copy bandwidth), plus HF-torch (sdpa)
                 at batch 1 / 8k for reference.
Prints a table; with $OUT set, writes generate_bench.json there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from benchmarks_common import random_params


def _table(rows, cols):
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def cpu_bench(prompt_tokens=2048, new_tokens=128):
    import jax
    import torch
    from transformers import AutoModelForCausalLM

    from kvjax.eval import load_text
    from kvjax.generation import generate
    from kvjax.loaders import load
    from kvjax.loaders.load import embedded_path
    from kvjax.native import native_available

    rows = []
    # kvjax twice: decode reading the GGUF's Q4_1/Q8_0 blocks (native kernel, the default on CPU)
    # and reading float32 weights (quantized_matmul=False, what HF reads too).
    variants = [(True, "GGUF blocks, native kernel")] if native_available() else []
    for quantized, what in variants + [(False, "float32 weights")]:
        m = load("smollm2", quantized_matmul=quantized)
        ids = m.tokenizer.encode(load_text("kjv-judges"))[:prompt_tokens]
        prompt = m.tokenizer.decode(ids)
        generate(m, prompt, max_new_tokens=new_tokens, stop_ids=())  # compile
        best = None
        for _ in range(3):
            out = generate(m, prompt, max_new_tokens=new_tokens, stop_ids=())
            s = out.stats
            if best is None or s["decode_s"] < best["decode_s"]:
                best = s
        rows.append(
            {
                "impl": f"kvjax (jax {jax.__version__}, jit; {what})",
                "prefill tok/s": f"{best['prefill_tokens_per_s']:.0f}",
                "decode tok/s": f"{(new_tokens - 1) / best['decode_s']:.1f}",
                "ms/step": f"{1000 * best['decode_s'] / (new_tokens - 1):.1f}",
            }
        )
        print(rows[-1], flush=True)
    path = embedded_path("smollm2")
    hf = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    x = torch.tensor([m.tokenizer.encode(prompt)])

    def timed(n):  # best of 3 generate() calls of n new tokens (the first token is the prefill)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            best = min(best, time.perf_counter() - t)
        return best

    with torch.no_grad():
        hf.generate(x, max_new_tokens=2, do_sample=False)
        prefill_s = timed(1)
        decode_s = timed(new_tokens) - prefill_s
    rows.append(
        {
            "impl": f"HF transformers (torch {torch.__version__}, sdpa; float32 weights)",
            "prefill tok/s": f"{x.shape[1] / prefill_s:.0f}",
            "decode tok/s": f"{(new_tokens - 1) / decode_s:.1f}",
            "ms/step": f"{1000 * decode_s / (new_tokens - 1):.1f}",
        }
    )
    print(
        f"SmolLM2-135M, CPU ({os.cpu_count()} cores), prompt {x.shape[1]} tokens, decode {new_tokens}, batch 1, float32"
    )
    _table(rows, ["impl", "prefill tok/s", "decode tok/s", "ms/step"])
    return rows


def _filled_state(cfg, batch, ctx, new, dtype):
    import jax
    import jax.numpy as jnp

    from kvjax.policies import Dense
    from kvjax.state import KVState, SlotKV

    cap = Dense().prefill_capacity(ctx, new)  # what generate() allocates (rounded up to the kernel block)
    shape = (batch, cfg.num_kv_heads, cap, cfg.head_dim)
    fill = jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32)).astype(dtype))
    pos = jnp.broadcast_to(jnp.where(jnp.arange(cap) < ctx, jnp.arange(cap), -1).astype(jnp.int32), shape[:3])
    layers = tuple(
        SlotKV(
            fill(jax.random.key(2 * i)), fill(jax.random.key(2 * i + 1)), jnp.array(pos), jnp.asarray(ctx, jnp.int32)
        )
        for i in range(cfg.num_layers)
    )
    return KVState(layers, jnp.full((batch,), ctx, jnp.int32))


def gpu_bench(contexts=(8192, 32768), batches=(1, 8), new_tokens=33, hf=True, fused_variants=(False, True)):
    import jax
    import jax.numpy as jnp

    from kvjax.generation import decode
    from kvjax.models.presets import LLAMA3_1_8B as cfg
    from kvjax.policies import Dense
    from kvjax.sampling import Sampler

    dev = jax.devices()[0]
    print("device:", dev.device_kind, "jax", jax.__version__, flush=True)
    x = jnp.ones((1 << 30,), jnp.float32)  # 4 GiB
    copy = jax.jit(lambda a: a * 1.0001)
    copy(x).block_until_ready()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        copy(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    bw = 2 * x.nbytes / min(ts)
    del x
    print(f"HBM copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    rows = []
    for fused in fused_variants:  # q/k/v and gate/up as one matmul each, or five
        vcfg = dataclasses.replace(cfg, fused_projections=fused)
        t = time.perf_counter()
        params = random_params(vcfg, jnp.bfloat16)
        jax.block_until_ready(params)
        weight_bytes = sum(p.nbytes for p in jax.tree_util.tree_leaves(params))
        print(f"weights ready in {time.perf_counter() - t:.1f}s ({weight_bytes / 1e9:.2f} GB)", flush=True)
        impl = "kvjax (fused projections)" if fused else "kvjax"
        for ctx in contexts:
            for b in batches:
                logits = jax.random.normal(jax.random.key(1), (b, vcfg.vocab_size), jnp.float32)
                kw = dict(
                    config=vcfg,
                    policy=Dense(),
                    max_new_tokens=new_tokens,
                    sampler=Sampler(),
                    stop_ids=(),
                    dtype=jnp.bfloat16,
                )
                times = []
                for _ in range(4):  # the first call compiles; decode donates (deletes) its input state
                    state = _filled_state(vcfg, b, ctx, new_tokens, jnp.bfloat16)
                    jax.block_until_ready(state)
                    t = time.perf_counter()
                    jax.block_until_ready(decode(params, state, logits, jax.random.key(0), **kw))
                    times.append(time.perf_counter() - t)
                times = times[1:]
                step = min(times) / (new_tokens - 1)
                kv_read = b * ctx * vcfg.kv_bytes_per_token(2)
                roof = (weight_bytes + kv_read) / bw
                rows.append(
                    {
                        "context": ctx,
                        "batch": b,
                        "impl": impl,
                        "ms/step": f"{1000 * step:.2f}",
                        "roofline ms": f"{1000 * roof:.2f}",
                        "x roofline": f"{step / roof:.2f}",
                        "tok/s": f"{b / step:.0f}",
                    }
                )
                print(rows[-1], flush=True)
                del state
        del params
    if hf:
        rows += _hf_gpu(cfg, bw, weight_bytes)
    print(f"Llama-3.1-8B-shaped random bf16 weights on {dev.device_kind}; HBM copy {bw / 1e12:.2f} TB/s")
    _table(rows, ["context", "batch", "impl", "ms/step", "roofline ms", "x roofline", "tok/s"])
    return rows


def _hf_gpu(cfg, bw, weight_bytes, ctx=8192, new=33):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hc = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        rope_theta=cfg.rope_theta,
        max_position_embeddings=131072,
    )
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(hc).eval()
    torch.set_default_dtype(torch.float32)
    model.config._attn_implementation = "sdpa"
    x = torch.randint(0, cfg.vocab_size, (1, ctx), device="cuda")
    with torch.no_grad():
        model.generate(x, max_new_tokens=2, do_sample=False)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
    step = ((t2 - t1) - (t1 - t0)) / (new - 1)
    roof = (weight_bytes + ctx * cfg.kv_bytes_per_token(2)) / bw
    del model
    torch.cuda.empty_cache()
    return [
        {
            "context": ctx,
            "batch": 1,
            "impl": f"HF-torch {torch.__version__} sdpa",
            "ms/step": f"{1000 * step:.2f}",
            "roofline ms": f"{1000 * roof:.2f}",
            "x roofline": f"{step / roof:.2f}",
            "tok/s": f"{1 / step:.0f}",
        }
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    ap.add_argument("--no-hf", action="store_true")
    a = ap.parse_args()
    rows = cpu_bench() if a.device == "cpu" else gpu_bench(hf=not a.no_hf)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "generate_bench.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
