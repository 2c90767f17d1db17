"""Device meshes and the one table of logical axis names.

Code in kvjax speaks logical names (batch, seq, heads, kv_heads, ...); `AXIS_RULES` maps
each to a mesh axis (or None = replicated), in the spirit of maxtext's `logical_axis_rules`.
`make_mesh` builds a mesh whose axes are those mesh names, for one host or many
(after `kvjax.parallel.multihost.initialize`, `jax.devices()` lists every process's devices).

    mesh = make_mesh(seq=4)                   # 4 devices on the ring axis
    spec = logical_spec(("batch", "seq", "heads", None), mesh)   # P(None, 'seq', None, None)
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
    "mlp": None,
    "vocab": None,
}

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
