"""Streaming loader: load time and peak host memory for a random bf16 safetensors checkpoint.

    python benchmarks/loader_bench.py --preset llama3.2-1b --dir /tmp/ckpt [--out results.jsonl]

Writes (once) an HF directory holding random weights of the preset's shapes in bfloat16 as
safetensors shards (<= 1 GB each), a config.json and a byte-level tokenizer; reads every shard
once with plain `readinto` (the raw read time, which also warms the page cache), then runs
`kvjax.load(dir)` in a fresh child process that reports:

    baseline_rss    resident bytes after `import kvjax` and backend start, before loading
    peak_rss        the process's high-water mark (VmHWM) after loading
    param_bytes     bytes of the placed parameters (on a CPU backend they live in host memory)
    overhead        peak_rss - baseline_rss - param_bytes on CPU (- 0 on an accelerator): the
                    host memory the loader itself needed, to compare with largest_tensor
    load_s, raw_read_s, bytes_read

tests/models/test_loader_memory.py runs this script (slow) and checks overhead <= 1.25 x the
largest tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

SHARD_BYTES = 1 << 30


def _hf_config(cfg) -> dict:
    rope = None
    if cfg.rope_scaling is not None:
        r = cfg.rope_scaling
        rope = {
            "rope_type": r.kind,
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position,
        }
    return {
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": list(cfg.eos_ids),
        "torch_dtype": "bfloat16",
    }


def _write_tokenizer(directory: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(directory, "tokenizer.json"))


def write_checkpoint(directory: str, cfg, seed: int = 0) -> dict:
    """Random bf16 weights of `cfg`'s shapes (HF names and layouts) as safetensors shards, streamed
    to disk tensor by tensor (one random block of 16M values, rolled per tensor). Returns
    {"files", "bytes", "largest_tensor"}."""
    import ml_dtypes

    from kvjax.loaders.convert import hf_name, param_shapes

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    block = (rng.standard_normal(1 << 24, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    tensors = []
    for path, leaf in __import__("jax").tree_util.tree_flatten_with_path(param_shapes(cfg)["params"])[0]:
        name, transposed = hf_name(tuple(k.key for k in path))
        tensors.append((name, tuple(reversed(leaf.shape)) if transposed else tuple(leaf.shape)))
    shards, current, size = [], [], 0
    for name, shape in sorted(tensors):
        n = int(np.prod(shape)) * 2
        if current and size + n > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += n
    shards.append(current)
    files = []
    for i, shard in enumerate(shards):
        fname = os.path.join(directory, f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        header, at = {}, 0
        for name, shape in shard:
            n = int(np.prod(shape)) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [at, at + n]}
            at += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for j, (_, shape) in enumerate(shard):
                left = int(np.prod(shape))
                roll = np.roll(block, j * 7919 + i)
                while left:
                    k = min(left, block.size)
                    f.write(roll[:k].tobytes())
                    left -= k
        files.append(fname)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(_hf_config(cfg), f)
    _write_tokenizer(directory)
    return {
        "files": files,
        "bytes": sum(os.path.getsize(x) for x in files),
        "largest_tensor": max(int(np.prod(s)) * 2 for _, s in tensors),
    }


def raw_read_seconds(directory: str) -> float:
    """Seconds to read every shard once into one reused 64 MB buffer."""
    buf = bytearray(64 << 20)
    t0 = time.perf_counter()
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with open(os.path.join(directory, name), "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass
    return time.perf_counter() - t0


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(directory: str) -> dict:
    """Load `directory` in this process (call it in a fresh one) and report memory and time."""
    import jax

    import kvjax

    jax.devices()
    baseline = _status("VmRSS")
    t0 = time.perf_counter()
    model = kvjax.load(directory)
    jax.block_until_ready(model.params)
    load_s = time.perf_counter() - t0
    peak = _status("VmHWM")
    on_host = jax.default_backend() == "cpu"
    param_bytes = model.load_stats["param_bytes"]
    return {
        "backend": jax.default_backend(),
        "baseline_rss": baseline,
        "peak_rss": peak,
        "param_bytes": param_bytes,
        "overhead": peak - baseline - (param_bytes if on_host else 0),
        "load_s": load_s,
        "bytes_read": model.load_stats["bytes_read"],
        "dtype": str(model.dtype),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama3.2-1b")
    ap.add_argument("--dir", required=True, help="checkpoint directory (written when it has no config.json)")
    ap.add_argument("--out", default=None, help="append the JSON record to this file")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.dir)))
        return {}
    from kvjax.models import get_preset

    cfg = get_preset(args.preset)
    info_path = os.path.join(args.dir, "bench_info.json")
    if not os.path.isfile(info_path):
        info = write_checkpoint(args.dir, cfg)
        with open(info_path, "w") as f:
            json.dump(info, f)
    with open(info_path) as f:
        info = json.load(f)
    raw = raw_read_seconds(args.dir)
    child = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--measure"],
        capture_output=True,
        text=True,
        check=False,
    )
    if child.returncode:
        raise SystemExit(f"measuring child failed:\n{child.stderr[-4000:]}")
    rec = {
        "preset": args.preset,
        "checkpoint_bytes": info["bytes"],
        "largest_tensor": info["largest_tensor"],
        "raw_read_s": raw,
        **json.loads(child.stdout.strip().splitlines()[-1]),
    }
    rec["overhead_over_largest"] = rec["overhead"] / rec["largest_tensor"]
    print(json.dumps(rec))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


if __name__ == "__main__":
    main()
