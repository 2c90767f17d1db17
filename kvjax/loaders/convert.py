"""Checkpoint tensors (HF names, [out, in] matrices) -> the model's parameter tree, as sources.

The model's own parameter shapes (`jax.eval_shape` of `init_params`) say which tensors a config
needs; each parameter path maps to one HF name (`hf_name`). The result is a tree of lazy
sources (`kvjax.loaders.sources`) with the model's structure and layouts: linear kernels
transposed to linen's [in, out], projections a checkpoint stores fused (Phi-3's qkv_proj,
gate_up_proj) split, and, with `fuse_groups`, q/k/v and gate/up laid side by side as the
model's fused projections (`kvjax.models.fuse`). Nothing is read until the tree is placed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..models.config import LlamaConfig
from .errors import ModelFileError
from .sources import Transposed, Window, interleave

#: Fused parts of a fused checkpoint matrix, in its row order: fused name -> parts.
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
#: The model's fused projections: (module, fused name, parts).
_GROUPS = (("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")), ("mlp", "gate_up_proj", ("gate_proj", "up_proj")))


@dataclasses.dataclass(frozen=True, eq=False)
class Quantized:
    """A kernel that keeps its GGUF blocks: float source [K, N], blocks source uint8 [N, bytes]
    (placed as a `kvjax.native.QuantizedWeight`)."""

    weight: object
    blocks: object
    kind: str

    @property
    def shape(self):
        return self.weight.shape


def param_shapes(config: LlamaConfig):
    """{'params': ...} of ShapeDtypeStructs: the parameters `config`'s model has (no memory)."""
    from ..models.forward import init_params

    return jax.eval_shape(lambda k: init_params(config, k, jnp.float32), jax.random.key(0))


def hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(HF tensor name, stored transposed) of a parameter path such as
    ('layers_3', 'self_attn', 'q_proj', 'kernel') -> ('model.layers.3.self_attn.q_proj.weight', True)."""
    *mods, leaf = path
    parts = [m.replace("layers_", "layers.") if m.startswith("layers_") else m for m in mods]
    prefix = "" if mods[0] == "lm_head" else "model."
    suffix = "bias" if leaf == "bias" else "weight"
    return prefix + ".".join(parts) + "." + suffix, leaf == "kernel"


def _part_rows(config: LlamaConfig, fused: str) -> dict[str, tuple[int, int]]:
    c = config
    if fused == "qkv_proj":
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return {"q_proj": (0, q), "k_proj": (q, q + kv), "v_proj": (q + kv, q + 2 * kv)}
    i = c.intermediate_size
    return {"gate_proj": (0, i), "up_proj": (i, 2 * i)}


def _lookup(tensors: dict, name: str, config: LlamaConfig):
    """The source of HF tensor `name`, or a row window of the fused tensor holding it."""
    if name in tensors:
        return tensors[name]
    module, proj, leaf = name.rsplit(".", 2)
    for fused, parts in _FUSED.items():
        whole = f"{module}.{fused}.{leaf}"
        if proj in parts and whole in tensors:
            lo, hi = _part_rows(config, fused)[proj]
            src = tensors[whole]
            if src.shape[0] != _part_rows(config, fused)[parts[-1]][1]:
                raise ModelFileError(
                    f"tensor {whole} has {src.shape[0]} rows, config expects "
                    f"{_part_rows(config, fused)[parts[-1]][1]} ({'+'.join(parts)})"
                )
            return Window(src, 0, lo, hi)
    return None


def param_sources(
    tensors: dict,
    config: LlamaConfig,
    source: str,
    blocks: dict | None = None,
    fuse_groups: int | None = None,
) -> tuple[dict, LlamaConfig]:
    """Check names and shapes against `config` and build the tree of parameter sources.

    tensors: HF name -> source in HF layout. blocks: HF name -> (block type, uint8 source) GGUF
    blocks of the same weights; those kernels become `Quantized` leaves (the embedding table
    keeps its blocks only when it is the tied LM head). fuse_groups: None keeps q/k/v and gate/up
    separate; g >= 1 fuses them, laid out in g groups (`sources.interleave`; g = the tensor-parallel
    size, 1 without one). Returns ({'params': tree}, config with fused_projections/fused_groups)."""
    config = dataclasses.replace(config, fused_projections=False, fused_groups=1)
    blocks = dict(blocks or {})
    if not config.tie_embeddings:
        blocks.pop("model.embed_tokens.weight", None)
    shapes = param_shapes(config)["params"]
    missing, tree = [], {}
    for path, shape in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        keys = tuple(k.key for k in path)
        name, transposed = hf_name(keys)
        src = _lookup(tensors, name, config)
        if src is None:
            missing.append(name)
            continue
        want = tuple(reversed(shape.shape)) if transposed else tuple(shape.shape)
        if tuple(src.shape) != want:
            raise ModelFileError(f"{source}: tensor {name} has shape {tuple(src.shape)}, config expects {want}")
        leaf = Transposed(src) if transposed else src
        if name in blocks:
            kind, raw = blocks[name]
            leaf = Quantized(leaf, raw, kind)
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    if missing:
        raise ModelFileError(f"{source}: missing {len(missing)} tensors for {config.name}, e.g. {missing[:3]}")
    if fuse_groups is None:
        return {"params": tree}, config
    return {"params": fuse_sources(tree, config, fuse_groups)}, dataclasses.replace(
        config, fused_projections=True, fused_groups=fuse_groups
    )


def _fuse_leaves(leaves: list, axis: int, groups: int):
    if all(isinstance(x, Quantized) for x in leaves) and len({x.kind for x in leaves}) == 1:
        return Quantized(
            interleave([x.weight for x in leaves], axis, groups),
            interleave([x.blocks for x in leaves], 0, groups),
            leaves[0].kind,
        )
    plain = [x.weight if isinstance(x, Quantized) else x for x in leaves]
    return interleave(plain, axis, groups)


def fuse_sources(tree: dict, config: LlamaConfig, groups: int) -> dict:
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj in every layer of a source tree (kernels
    along their output axis, biases along theirs), in `groups` groups."""
    out = dict(tree)
    for i in range(config.num_layers):
        layer = dict(out[f"layers_{i}"])
        for module, fused, parts in _GROUPS:
            sub = dict(layer[module])
            pieces = [sub.pop(p) for p in parts]
            sub[fused] = {k: _fuse_leaves([p[k] for p in pieces], 1 if k == "kernel" else 0, groups) for k in pieces[0]}
            layer[module] = sub
        out[f"layers_{i}"] = layer
    return out
