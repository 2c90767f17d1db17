"""Sequence (context) parallelism: meshes, ring attention, sharded prefill/decode, multi-host.

mesh = kvjax.parallel.make_mesh(seq=4)
out = kvjax.parallel.generate(model, prompt, mesh=mesh, policy="dense", max_new_tokens=64)
"""

from . import multihost
from .context import Plan, decode, prefill
from .generate import generate, put_prompt
from .layout import LAYOUTS, inverse_order, padded_length, ring_order
from .mesh import AXIS_RULES, logical_sharding, logical_spec, make_mesh, require_axis, shard_map
from .ring import ring_attention, ring_attention_local
from .sharded_policy import SeqSharded, shard_merge_attention

__all__ = [
    "AXIS_RULES",
    "LAYOUTS",
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
    "prefill",
    "put_prompt",
    "require_axis",
    "ring_attention",
    "ring_attention_local",
    "ring_order",
    "shard_map",
    "shard_merge_attention",
]
