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

from ..models.config import LlamaConfig
from .errors import ModelFileError
from .hf_config import SUPPORTED_MODEL_TYPES, config_from_hf, text_tensor_name
from .sources import ByteCounter, FileTensor


def read_config(directory: str) -> LlamaConfig:
    """The model's LlamaConfig from `directory`/config.json (`kvjax.loaders.hf_config`)."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ModelFileError(f"{directory}: no config.json (expected an HF model directory)")
    try:
        with open(path) as f:
            c = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{path}: invalid JSON: {e}") from e
    return config_from_hf(c, path, os.path.basename(os.path.normpath(directory)))


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
    """Every language-model tensor of every *.safetensors shard of `directory`, by its HF name
    (read lazily; other towers of a multimodal checkpoint are left out)."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise ModelFileError(f"{directory}: no *.safetensors files")
    out = {}
    for path in files:
        for name, src in file_tensors(path, counter).items():
            text = text_tensor_name(name)  # a multimodal checkpoint's language model, by its text names
            if text is not None:
                out[text] = src
    return out


__all__ = ["SUPPORTED_MODEL_TYPES", "file_tensors", "read_config", "tensor_sources"]
