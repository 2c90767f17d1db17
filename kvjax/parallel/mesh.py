"""Device meshes and the one table of logical axis names.

Code in kvjax speaks logical names (batch, seq, heads, kv_heads, ...); `AXIS_RULES` maps
each to a mesh axis (or None = replicated), in the spirit of maxtext's `logical_axis_rules`.
Activations, the KV state and every parameter (`PARAM_AXES`) are named in it, so one table
decides the whole layout. `make_mesh` builds a mesh whose axes are those mesh names, for one
host or many (after `kvjax.parallel.multihost.initialize`, `jax.devices()` lists every
process's devices).

    mesh = make_mesh(seq=4)                   # 4 devices on the ring axis
    spec = logical_spec(("batch", "seq", "heads", None), mesh)   # P(None, 'seq', None, None)
    shardings = param_shardings(params, config, make_mesh(seq=1, tensor=4))  # tensor parallel

Parameters follow Megatron-LM (Shoeybi et al. 2019): q/k/v and gate/up are split by output
columns ("heads", "kv_heads", "mlp"), o_proj and down_proj by input rows, the embedding table
and LM head by vocabulary rows; norms are replicated. "embed" (the model dimension) is not
sharded: parameters are replicated over "data" and "seq" (no FSDP).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: logical axis name -> mesh axis name (None: never sharded). The only place this lives.
AXIS_RULES: dict[str, str | None] = {
    "batch": "data",
    "seq": "seq",  # prompt tokens and cache slots (ring / context parallelism)
    "kv_seq": "seq",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "embed": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "norm": None,
}

#: parameter module name -> {leaf name: logical axes of its dimensions}. Kernels are linen's
#: [in, out]; `kvjax.models.llama` names every parameter in this table (tests check it).
PARAM_AXES: dict[str, dict[str, tuple[str | None, ...]]] = {
    "embed_tokens": {"embedding": ("vocab", "embed")},
    "lm_head": {"kernel": ("embed", "vocab")},
    "q_proj": {"kernel": ("embed", "heads"), "bias": ("heads",)},
    "k_proj": {"kernel": ("embed", "kv_heads"), "bias": ("kv_heads",)},
    "v_proj": {"kernel": ("embed", "kv_heads"), "bias": ("kv_heads",)},
    "qkv_proj": {"kernel": ("embed", "heads"), "bias": ("heads",)},  # grouped per shard (models.fuse)
    "o_proj": {"kernel": ("heads", "embed")},
    "gate_proj": {"kernel": ("embed", "mlp")},
    "up_proj": {"kernel": ("embed", "mlp")},
    "gate_up_proj": {"kernel": ("embed", "mlp")},  # grouped per shard (models.fuse)
    "down_proj": {"kernel": ("mlp", "embed")},
    "*norm": {"scale": ("norm",)},  # every RMSNorm: input, post-attention, final, q/k norms
}

#: what each sharded logical axis splits, for messages: logical name -> config field.
_AXIS_FIELDS = {"heads": "num_heads", "kv_heads": "num_kv_heads", "mlp": "intermediate_size", "embed": "hidden_size"}

#: mesh axes `make_mesh` creates, outermost first (the ring axis sits inside `data`).
MESH_AXES: tuple[str, ...] = ("data", "seq", "tensor")


def mesh_axis(logical: str, rules: dict[str, str | None] | None = None) -> str | None:
    """Mesh axis a logical axis name maps to (KeyError-free: unknown names raise ValueError)."""
    rules = AXIS_RULES if rules is None else rules
    if logical not in rules:
        raise ValueError(f"unknown logical axis {logical!r}; expected one of {sorted(rules)}")
    return rules[logical]


def require_axis(mesh: Mesh, axis: str) -> int:
    """Size of mesh axis `axis`; a clear ValueError when the mesh lacks it."""
    if axis not in mesh.shape:
        raise ValueError(
            f"mesh has no axis {axis!r}: its axes are {tuple(mesh.axis_names)}; build it with "
            f"kvjax.parallel.make_mesh(seq=...) or pass axis= one of those names"
        )
    return int(mesh.shape[axis])


def logical_spec(
    names: Sequence[str | None], mesh: Mesh | None = None, rules: dict[str, str | None] | None = None
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry logical `names` (None = replicated).
    Mesh axes absent from `mesh` (or of size 1) are dropped, so one spec serves every mesh."""
    out = []
    for name in names:
        axis = None if name is None else mesh_axis(name, rules)
        if axis is not None and mesh is not None and (axis not in mesh.shape or mesh.shape[axis] == 1):
            axis = None
        out.append(axis)
    return PartitionSpec(*out)


def logical_sharding(names: Sequence[str | None], mesh: Mesh, rules=None) -> NamedSharding:
    """NamedSharding of `logical_spec(names, mesh)`."""
    return NamedSharding(mesh, logical_spec(names, mesh, rules))


def make_mesh(
    seq: int | None = None, *, data: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Mesh with axes ("data", "seq", "tensor") over `devices` (default: all devices of
    all processes). `seq=None` puts every device not used by data/tensor on the ring axis.

    Raises ValueError when the sizes do not multiply to the number of devices."""
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("data", data), ("tensor", tensor)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}={size!r} must be a positive integer")
    if seq is None:
        if len(devices) % (data * tensor):
            raise ValueError(f"{len(devices)} devices cannot be split into data={data} x tensor={tensor}")
        seq = len(devices) // (data * tensor)
    if not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq={seq!r} must be a positive integer")
    shape = (data, seq, tensor)
    if math.prod(shape) != len(devices):
        raise ValueError(
            f"mesh data={data} x seq={seq} x tensor={tensor} = {math.prod(shape)} devices, "
            f"but {len(devices)} devices were given"
        )
    try:  # topology-aware order on TPU/GPU slices; plain order elsewhere
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


def param_axes(path: Sequence[str]) -> tuple[str | None, ...]:
    """Logical axes of the parameter at `path` (e.g. ('layers_0', 'self_attn', 'q_proj', 'kernel'))."""
    *mods, leaf = path
    module = mods[-1] if mods else ""
    table = PARAM_AXES.get(module) or (PARAM_AXES["*norm"] if module.endswith("norm") else None)
    if table is None or leaf not in table:
        raise ValueError(f"no sharding rule for the parameter {'/'.join(path)}; add it to PARAM_AXES")
    return table[leaf]


def param_spec(path: Sequence[str], shape: Sequence[int], config, mesh: Mesh) -> PartitionSpec:
    """PartitionSpec of one parameter on `mesh`. A vocabulary that the tensor axis does not
    divide stays replicated (the model then gathers nothing); any other axis that does not
    divide is an error naming the config field."""
    names = param_axes(path)
    if len(names) != len(shape):
        raise ValueError(f"parameter {'/'.join(path)} has shape {tuple(shape)}, its rule names {names}")
    spec = list(logical_spec(names, mesh))
    for d, (name, axis) in enumerate(zip(names, spec)):
        if axis is None or shape[d] % mesh.shape[axis] == 0:
            continue
        if name == "vocab":
            spec[d] = None
            continue
        field = _AXIS_FIELDS.get(name, name)
        raise ValueError(
            f"{field}={getattr(config, field, shape[d])} cannot be split over the mesh axis {axis!r} of size "
            f"{mesh.shape[axis]} (parameter {'/'.join(path)}, shape {tuple(shape)})"
        )
    return PartitionSpec(*spec)


def param_shardings(params, config, mesh: Mesh):
    """A tree of NamedShardings for `params` (arrays, ShapeDtypeStructs or loader sources; with or
    without the {'params': ...} wrapper), by `param_spec`."""
    import jax.tree_util as jtu

    def one(path, x):
        keys = tuple(k.key for k in path if hasattr(k, "key"))
        keys = keys[1:] if keys and keys[0] == "params" else keys
        return NamedSharding(mesh, param_spec(keys, x.shape, config, mesh))

    return jtu.tree_map_with_path(one, params, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` (replication checks off), or `jax.experimental.shard_map.shard_map`
    on JAX versions without it."""
    if hasattr(jax, "shard_map"):
        try:
            return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        except TypeError:  # pragma: no cover - a jax.shard_map without check_vma
            return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover - old JAX

    return legacy(f, mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
