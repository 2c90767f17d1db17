"""Read Llama-family GGUF files (llama.cpp) with the `gguf` package, tensor by tensor.

llama.cpp's converter permutes the rows of q and k so that its interleaved RoPE can run
on them; we undo it per head (as transformers does) so the standard rotate-half RoPE applies.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import numpy as np

from ..models.config import LlamaConfig
from .errors import ModelFileError
from .sources import Unpermuted, normalize

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


@functools.cache
def _reader_class():
    """gguf's `GGUFReader`, reading through a plain ndarray view of its memory map.

    The reader slices its `np.memmap` once for every metadata value (300k times for SmolLM2's
    49k-token vocabulary and merges). Each memmap slice runs numpy's Python-level `__getitem__`
    and `__array_finalize__`; a plain view of the same mapped bytes slices in C. The fields and
    tensors are the same, and tensor data stays lazily mapped. Where a gguf release changes the
    private `_get` this overrides, the stock reader is used."""
    import inspect

    import gguf

    base = gguf.GGUFReader
    if list(inspect.signature(getattr(base, "_get", lambda: None)).parameters) != [
        "self",
        "offset",
        "dtype",
        "count",
        "override_order",
    ]:
        return base

    class PlainViewReader(base):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:
                plain = self._plain = self.data.view(np.ndarray)
            dtype, count = np.dtype(dtype), int(count)
            arr = plain[offset : offset + dtype.itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return PlainViewReader


def open_reader(path: str):
    """A `gguf.GGUFReader` for `path` (`_reader_class`); ModelFileError for a missing or unreadable
    file."""
    if not os.path.isfile(path):
        raise ModelFileError(f"GGUF file not found: {path}")
    try:
        return _reader_class()(path)
    except Exception as e:  # the reader raises assorted errors on bad bytes
        raise ModelFileError(
            f"{path}: not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}"
        ) from e


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def read_config(reader, path: str) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFileError(f"{path}: unsupported architecture {arch!r}; kvjax reads {SUPPORTED_ARCHITECTURES}")

    def need(key):
        val = _field(reader, f"{arch}.{key}")
        if val is None:
            raise ModelFileError(f"{path}: GGUF metadata lacks {arch}.{key}")
        return val

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        name=str(_field(reader, "general.name", os.path.basename(path))),
        model_type=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        max_position=int(_field(reader, f"{arch}.context_length", 4096)),
        tie_embeddings="output.weight" not in tensor_names,
        qkv_bias=arch == "qwen2",
        bos_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_ids=(int(eos),) if eos is not None else (),
        pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", eos if eos is not None else 0)),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFTensor:
    """A GGUF tensor as a source (`kvjax.loaders.sources`) in HF layout ([out, in] for matrices):
    a row slice reads those rows' bytes (quantized blocks or floats) from the file's memory map
    and dequantizes them to float32 (`gguf.quants.dequantize`); a column slice is cut after.
    raw=True reads the quantized blocks themselves: uint8 [out, in/32*bytes]."""

    tensor: object
    name: str
    path: str
    raw: bool = False
    counter: object = None

    @property
    def shape(self):
        if self.raw:
            return tuple(self.tensor.data.shape)
        return tuple(int(d) for d in reversed(self.tensor.shape))

    @property
    def dtype(self):
        return np.dtype(np.uint8) if self.raw else np.dtype(np.float32)

    def read(self, index=None) -> np.ndarray:
        from gguf.quants import dequantize

        index = normalize(index, self.shape)
        data = self.tensor.data
        rows = np.array(data[index[0]])  # the rows' bytes only (a slice of the memory map)
        if self.counter is not None:
            self.counter.add(rows.nbytes)
        if not self.raw:
            try:
                rows = dequantize(rows, self.tensor.tensor_type)
            except Exception as e:
                raise ModelFileError(
                    f"{self.path}: cannot decode tensor {self.tensor.name} ({self.tensor.tensor_type.name}): {e}"
                ) from e
            rows = np.asarray(rows, np.float32).reshape((index[0].stop - index[0].start, *self.shape[1:]))
        return np.ascontiguousarray(rows[(slice(None), *index[1:])])


def tensor_sources(reader, config: LlamaConfig, path: str, counter=None, blocks: bool = False) -> tuple[dict, dict]:
    """Sources of every tensor under HF names ([out, in] matrices, q/k rows in rotate-half order),
    and (blocks=True) of the raw quantized blocks of every 2-D weight of a type in BLOCK_TYPES:
    name -> (block type, uint8 source [N, K/32*bytes]), row n holding W[n, :]."""
    arch = _field(reader, "general.architecture")
    out, raw = {}, {}
    for t in reader.tensors:
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            if rest not in _LAYER_NAMES:
                continue  # e.g. rope_freqs; not used by these architectures
            hf = f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
        else:
            continue
        heads = None
        if arch == "llama" and hf.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            heads = config.num_heads
        if arch == "llama" and hf.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            heads = config.num_kv_heads
        src = GGUFTensor(t, hf, path, counter=counter)
        out[hf] = Unpermuted(src, heads) if heads else src
        kind = BLOCK_TYPES.get(t.tensor_type.name)
        if blocks and kind is not None and len(t.shape) == 2:
            b = GGUFTensor(t, hf, path, raw=True, counter=counter)
            raw[hf] = (kind, Unpermuted(b, heads) if heads and hf.endswith(".weight") else b)
    return out, raw


# GGUF tensor types whose raw blocks the native CPU kernel reads (kvjax.native).
BLOCK_TYPES = {"Q4_1": "q4_1", "Q8_0": "q8_0"}


def read_tokenizer_parts(reader) -> dict:
    """Vocabulary, merges, token types, special ids and chat template from metadata."""
    f = reader.fields
    if "tokenizer.ggml.tokens" not in f:
        raise ModelFileError("GGUF file carries no tokenizer (tokenizer.ggml.tokens missing)")
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelFileError(f"GGUF tokenizer model {model!r} is not supported (kvjax reads byte-level BPE 'gpt2')")
    return {
        "tokens": list(_field(reader, "tokenizer.ggml.tokens")),
        "merges": list(_field(reader, "tokenizer.ggml.merges") or []),
        "token_type": list(_field(reader, "tokenizer.ggml.token_type") or []),
        "pre": _field(reader, "tokenizer.ggml.pre"),
        "bos_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
