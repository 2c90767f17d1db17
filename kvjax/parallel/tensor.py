"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019): weights, heads and the KV state split
over the "tensor" mesh axis.

Inside `shard_map` every shard runs the unchanged model with `shard_config(config, ...)`: the
shard's share of query heads, KV heads and MLP columns (and of the vocabulary, when the axis
divides it), with `tensor_axis` set so that o_proj and down_proj reduce their partial sums with
one `psum` each, the embedding sums the shards' rows and the logits are gathered
(`kvjax.models.llama`). The policy sees the shard's heads only: every compression method runs
per head shard, and the KV state never leaves the shard that computed it. The parameters'
global layout is `kvjax.parallel.mesh.param_shardings` (the loader places them so directly).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ..models.config import LlamaConfig
from ..models.fuse import fuse_projections
from ..native.weights import QuantizedWeight
from . import multihost
from .mesh import param_shardings

#: config fields a tensor-parallel shard divides (each must be a multiple of the axis size).
SPLIT_FIELDS = ("num_heads", "num_kv_heads", "intermediate_size")


def tensor_size(mesh: Mesh, axis: str = "tensor") -> int:
    return int(mesh.shape[axis]) if axis in mesh.shape else 1


def check_divisible(config: LlamaConfig, size: int, axis: str = "tensor") -> None:
    """ValueError naming the config field that `size` shards cannot split."""
    for field in SPLIT_FIELDS:
        value = getattr(config, field)
        if value % size:
            raise ValueError(
                f"{field}={value} of {config.name} cannot be split over the mesh axis {axis!r} of size {size}; "
                f"use a tensor size that divides num_kv_heads={config.num_kv_heads}, num_heads={config.num_heads} "
                f"and intermediate_size={config.intermediate_size}"
            )


def shard_config(config: LlamaConfig, size: int, axis: str = "tensor") -> LlamaConfig:
    """The config one of `size` tensor-parallel shards runs with inside shard_map (module doc).
    The vocabulary is split only when `size` divides it (else every shard keeps all of it)."""
    if size == 1:
        return config
    check_divisible(config, size, axis)
    if config.fused_projections and config.fused_groups != size:
        raise ValueError(
            f"the fused projections of {config.name} are laid out in fused_groups={config.fused_groups} groups, "
            f"not one per shard of the mesh axis {axis!r} (size {size}); regroup them with "
            f"kvjax.parallel.shard_params or kvjax.models.fuse_projections(params, config, groups={size})"
        )
    vocab = config.vocab_size % size == 0
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // size,
        num_kv_heads=config.num_kv_heads // size,
        intermediate_size=config.intermediate_size // size,
        vocab_size=config.vocab_size // size if vocab else config.vocab_size,
        fused_groups=1,
        tensor_axis=axis,
        vocab_parallel=vocab,
    )


def shard_params(params, config: LlamaConfig, mesh: Mesh):
    """(params placed by `param_shardings` on `mesh`, config): fused projections regrouped one
    group per tensor shard when they are not, arrays already in place kept as they are. In a
    multi-process job every process must pass the same values (each keeps only its devices'
    slices); prefer `kvjax.load(path, mesh=mesh)`, which reads only those slices."""
    size = tensor_size(mesh)
    if size > 1:
        check_divisible(config, size)
        # GGUF blocks (the CPU decode kernel's) are not split: keep the float weights.
        params = jax.tree.map(
            lambda x: x.weight if isinstance(x, QuantizedWeight) else x,
            params,
            is_leaf=lambda x: isinstance(x, QuantizedWeight),
        )
    if config.fused_projections and config.fused_groups != size:
        params, config = fuse_projections(params, config, groups=size)
    shardings = param_shardings(params, config, mesh)

    def put(x, sharding: NamedSharding):
        if isinstance(x, QuantizedWeight):  # replicated (nothing is split here): blocks beside the weight
            return QuantizedWeight(put(x.weight, sharding), put(x.blocks, sharding), x.block_type)
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return multihost.global_array(lambda idx: host[idx], host.shape, host.dtype, sharding)

    is_weight = lambda x: isinstance(x, QuantizedWeight)
    return jax.tree.map(put, params, shardings, is_leaf=is_weight), config


def param_specs(params, config: LlamaConfig, mesh: Mesh):
    """The PartitionSpecs of `param_shardings` (shard_map's in_specs for the parameters)."""
    return jax.tree.map(lambda s: s.spec, param_shardings(params, config, mesh))
