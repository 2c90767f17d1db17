"""Sequence (context) and tensor parallelism: meshes, ring attention, sharded weights,
sharded prefill/decode, multi-host.

mesh = kvjax.parallel.make_mesh(seq=2, tensor=4)
model = kvjax.load(path, mesh=mesh)   # each device reads only its slice of the weights
out = kvjax.parallel.generate(model, prompt, mesh=mesh, policy="dense", max_new_tokens=64)
"""

from . import multihost
from .context import Plan, decode, prefill
from .generate import generate, put_prompt
from .layout import LAYOUTS, inverse_order, padded_length, ring_order
from .mesh import (
    AXIS_RULES,
    PARAM_AXES,
    logical_sharding,
    logical_spec,
    make_mesh,
    param_axes,
    param_shardings,
    require_axis,
    shard_map,
)
from .ring import ring_attention, ring_attention_local
from .sharded_policy import SeqSharded, shard_merge_attention
from .tensor import shard_config, shard_params

__all__ = [
    "AXIS_RULES",
    "LAYOUTS",
    "PARAM_AXES",
    "Plan",
    "SeqSharded",
    "decode",
    "generate",
    "inverse_order",
    "logical_sharding",
    "logical_spec",
    "make_mesh",
    "multihost",
    "padded_length",
    "param_axes",
    "param_shardings",
    "prefill",
    "put_prompt",
    "require_axis",
    "ring_attention",
    "ring_attention_local",
    "ring_order",
    "shard_config",
    "shard_map",
    "shard_merge_attention",
    "shard_params",
]
