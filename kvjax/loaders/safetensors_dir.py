"""Read HF-format model directories: config.json + *.safetensors shards + tokenizer.json.

Tensors are never read here: `tensor_sources` parses each shard's header and returns lazy
sources that read any slice of a tensor, in its stored dtype, when the loader places it.
"""

from __future__ import annotations

import glob
import json
import math
import os

import numpy as np

from ..models.config import LlamaConfig, RopeScaling
from .errors import ModelFileError
from .sources import ByteCounter, FileTensor

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def read_config(directory: str) -> LlamaConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelFileError(f"{directory}: no config.json (expected an HF model directory)")
    try:
        with open(path) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(c, dict):
        raise ModelFileError(f"{path}: expected a JSON object, got {type(c).__name__}")
    kind = c.get("model_type")
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ModelFileError(f"{path}: unsupported model_type {kind!r}; kvjax reads {SUPPORTED_MODEL_TYPES}")

    def need(key: str, where: dict = c, what: str = "config.json"):
        if where.get(key) is None:
            raise ModelFileError(f"{path}: {what} lacks the field {key!r} (needed for a {kind} model)")
        return where[key]

    scaling = None
    rs = c.get("rope_scaling") or (c.get("rope_parameters") if isinstance(c.get("rope_parameters"), dict) else None)
    if rs:
        rtype = rs.get("rope_type", rs.get("type"))
        what = f"its {rtype} rope scaling"
        if rtype == "llama3":
            scaling = RopeScaling(
                "llama3",
                need("factor", rs, what),
                need("low_freq_factor", rs, what),
                need("high_freq_factor", rs, what),
                need("original_max_position_embeddings", rs, what),
            )
        elif rtype == "linear":
            scaling = RopeScaling("linear", need("factor", rs, what))
        elif rtype not in (None, "default"):
            raise ModelFileError(f"{path}: unsupported rope scaling {rtype!r}")
    theta = c.get("rope_theta", (rs or {}).get("rope_theta", 10000.0))
    heads = need("num_attention_heads")
    eos = c.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    window = c.get("sliding_window") if c.get("use_sliding_window", kind == "mistral") else None
    return LlamaConfig(
        name=c.get("_name_or_path") or os.path.basename(os.path.normpath(directory)),
        vocab_size=need("vocab_size"),
        hidden_size=need("hidden_size"),
        intermediate_size=need("intermediate_size"),
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=c.get("num_key_value_heads", heads),
        head_dim=c.get("head_dim") or need("hidden_size") // heads,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=c.get("rms_norm_eps", 1e-5),
        max_position=c.get("max_position_embeddings", 4096),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        qkv_bias=kind == "qwen2",
        sliding_window=window,
        bos_id=c.get("bos_token_id"),
        eos_ids=eos_ids,
        pad_id=c.get("pad_token_id") if c.get("pad_token_id") is not None else (eos_ids[0] if eos_ids else 0),
    )


_DTYPES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def _np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    kind = _DTYPES[name]
    return np.dtype(getattr(ml_dtypes, kind, None) or kind)


def file_tensors(path: str, counter: ByteCounter | None = None) -> dict[str, FileTensor]:
    """The tensors of one .safetensors file as lazy sources (`kvjax.loaders.sources`), from its
    header alone: an 8-byte little-endian header size, a JSON header {name: {dtype, shape,
    data_offsets}}, then the data. Nothing else of the file is read here."""
    bad = f"{path}: unreadable safetensors file (truncated or corrupt?)"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFileError(f"{bad}: {size} bytes")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise ModelFileError(f"{bad}: header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelFileError(f"{bad}: header is not JSON: {e}") from e
    base, out = 8 + n, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _np_dtype(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFileError(f"{bad}: bad header entry for {name}: {info!r}") from e
        if end - begin != math.prod(shape) * dtype.itemsize or base + end > size:
            raise ModelFileError(f"{bad}: tensor {name} needs bytes {base + begin}..{base + end} of {size}")
        out[name] = FileTensor(path, base + begin, shape, dtype, counter)
    return out


def tensor_sources(directory: str, counter: ByteCounter | None = None) -> dict[str, FileTensor]:
    """Every tensor of every *.safetensors shard of `directory`, by name (read lazily)."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ModelFileError(f"{directory}: no *.safetensors files")
    out = {}
    for path in files:
        out.update(file_tensors(path, counter))
    return out
