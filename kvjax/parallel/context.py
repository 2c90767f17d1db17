"""Context-parallel prefill and decode of the whole model over the `seq` mesh axis.

    logits, state = prefill(params, tokens, lengths, mesh=mesh, config=cfg, policy=p, max_new_tokens=64)
    out, n_out, state = decode(params, state, logits, key, mesh=mesh, config=cfg, policy=p, ...)

The prompt [B, T] is put in ring order (zigzag by default), sharded along T, and the
unchanged model (`kvjax.models.forward`) runs inside `shard_map` with `SeqSharded(policy)`:
every matmul is token-local, attention is a ring. The KV state that comes out is sharded
along the slot axis: each shard keeps its own tokens' slots (+ decode headroom).

Global layout of a sharded state (how shards' local states are stitched together): a
leaf of rank >= 3 ([B, N, S, ...], the slot layout of kvjax states) is the concatenation
of the shards' leaves along S (axis 2, sharded over `seq`); a leaf of rank < 3 (counters
such as `fill`) gets a leading axis with one entry per shard. `KVState.lengths` is
replicated, and so is the work over mesh axes other than the ring axis (context
parallelism shards the sequence only). `nbytes` of the global state is the memory of all
shards together; each shard keeps `max_new_tokens` decode slots (only shard 0 fills them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from .. import generation as gen
from ..models.config import LlamaConfig
from ..models.forward import hidden_states, logits_from_hidden
from ..policies.base import Policy
from ..sampling import Sampler
from ..state import KVState, LayerContext
from .kernels import resolve_prefix_implementation
from .layout import check_layout, multiple_for, ring_order
from .mesh import require_axis, shard_map
from .sharded_policy import SeqSharded


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of a context-parallel run (hashable: a jit static argument).

    axis: ring mesh axis; layout: token order (kvjax.parallel.layout); prefix_implementation: None
    (ring blocks through `attend`) or the zigzag schedule's prefix-block implementation,
    "reference", "pallas" or "cudnn" (`kvjax.parallel.kernels`; `kernel=` is its deprecated name)."""

    mesh: Mesh
    axis: str = "seq"
    layout: str = "zigzag"
    prefix_implementation: str | None = None
    kernel: str | None = None  # deprecated name of prefix_implementation (moved there, then None)

    def __post_init__(self):
        prefix = resolve_prefix_implementation(self.prefix_implementation, self.kernel, optional=True)
        object.__setattr__(self, "prefix_implementation", prefix)
        object.__setattr__(self, "kernel", None)
        require_axis(self.mesh, self.axis)
        check_layout(self.layout)
        if self.prefix_implementation is not None and self.layout != "zigzag":
            raise ValueError(
                f"prefix_implementation={self.prefix_implementation!r} needs layout='zigzag', got layout={self.layout!r}"
            )

    @property
    def size(self) -> int:
        return int(self.mesh.shape[self.axis])

    @property
    def multiple(self) -> int:
        """Prompt widths must be a multiple of this."""
        return multiple_for(self.layout, self.size)

    def check_width(self, width: int) -> None:
        if width % self.multiple:
            raise ValueError(
                f"prompt width {width} must be a multiple of {self.multiple} (layout={self.layout!r} over "
                f"mesh axis {self.axis!r} of size {self.size}); pad it, e.g. with "
                f"kvjax.generation.bucket_length(n, multiple={self.multiple})"
            )

    def local_token_index(self, width_local: int) -> jax.Array:
        """Original token index [T/n] of this shard's tokens (inside shard_map)."""
        n, i = self.size, lax.axis_index(self.axis)
        ar = jnp.arange(width_local, dtype=jnp.int32)
        if self.layout == "contiguous":
            return i * width_local + ar
        if self.layout == "striped":
            return i + n * ar
        c = width_local // 2
        return jnp.where(ar < c, i * c + ar, (2 * n - 1 - i) * c + ar - c)


# ---- global <-> local state -------------------------------------------------------------
def _leaf_spec(ndim: int, plan: Plan) -> P:
    """Spec of a global leaf built from a local leaf of rank `ndim` (module doc)."""
    if ndim >= 3:
        return P(None, None, plan.axis, *([None] * (ndim - 3)))
    return P(plan.axis, *([None] * ndim)) if plan.size > 1 else P()


def _is_stacked(spec: P, plan: Plan) -> bool:
    """A rank < 3 leaf kept once per shard (a one-shard ring keeps leaves as they are)."""
    return plan.size > 1 and len(spec) > 0 and spec[0] == plan.axis


def _to_global(layers, plan: Plan):
    return jax.tree.map(lambda x: x if x.ndim >= 3 or plan.size == 1 else x[None], layers)


def _to_local(layers, stacked):
    leaves, tree = jax.tree.flatten(layers)
    return jax.tree.unflatten(tree, [x[0] if s else x for x, s in zip(leaves, stacked)])


def _in_ring_order(tokens, plan: Plan):
    order = ring_order(tokens.shape[1], plan.size, plan.layout)
    return jnp.take(tokens, jnp.asarray(order), axis=1)


@functools.partial(
    jax.jit, static_argnames=("plan", "config", "policy", "max_new_tokens", "dtype", "implementation", "ordered")
)
def prefill(
    params,
    tokens,
    lengths,
    *,
    plan: Plan,
    config: LlamaConfig,
    policy: Policy,
    max_new_tokens: int,
    dtype=jnp.float32,
    implementation: str | None = None,
    ordered: bool = False,
):
    """Context-parallel prefill of tokens [B, W] (right-padded, true lengths [B]).

    W must be a multiple of `plan.multiple`. ordered=True: tokens are already in ring
    order (e.g. loaded shard by shard, `kvjax.parallel.multihost`). Returns (logits at each
    row's last prompt token [B, V] float32, sharded KVState; see module doc)."""
    w = tokens.shape[1]
    plan.check_width(w)
    pol = SeqSharded(policy, plan.axis, plan.prefix_implementation)
    toks = tokens if ordered else _in_ring_order(tokens, plan)

    def local(params, toks, lengths):
        bl, wl = toks.shape
        idx = plan.local_token_index(wl)
        pos = jnp.where(idx[None, :] < lengths[:, None], idx[None, :], -1)
        state = pol.init_state(config, bl, wl, max_new_tokens, dtype)
        ctx = LayerContext(0, config, "prefill", True, wl, max_new_tokens, implementation)
        h, state = hidden_states(params, toks, pos, state, config=config, policy=pol, ctx=ctx, dtype=dtype)
        here = (pos == (lengths - 1)[:, None])[..., None]
        last = lax.psum(jnp.sum(jnp.where(here, h.astype(jnp.float32), 0.0), axis=1), plan.axis).astype(h.dtype)
        logits = logits_from_hidden(params, last, config=config, dtype=dtype)
        return logits, state.replace(lengths=lengths.astype(jnp.int32))

    def local_global(params, toks, lengths):
        logits, state = local(params, toks, lengths)
        return logits, state.replace(layers=_to_global(state.layers, plan))

    in_specs = (P(), P(None, plan.axis), P())
    # One shard's state shapes (the policy may change the state type at prefill, e.g. Compose).
    shapes = jax.eval_shape(
        shard_map(local, mesh=plan.mesh, in_specs=in_specs, out_specs=(P(), P())), params, toks, lengths
    )[1]
    specs = KVState(layers=jax.tree.map(lambda x: _leaf_spec(x.ndim, plan), shapes.layers), lengths=P())
    return shard_map(local_global, mesh=plan.mesh, in_specs=in_specs, out_specs=(P(), specs))(params, toks, lengths)


def decode(
    params,
    state: KVState,
    first_logits,
    key,
    *,
    plan: Plan,
    config: LlamaConfig,
    policy: Policy,
    max_new_tokens: int,
    sampler: Sampler = Sampler(),
    stop_ids: tuple[int, ...] = (),
    dtype=jnp.float32,
    implementation: str | None = None,
):
    """`kvjax.generation.decode` on a sequence-sharded state (from `prefill`): every shard
    runs the same loop; attention merges the shards' partial results (LSE) each step.
    Returns (tokens [B, max_new] int32, n_out [B], sharded KVState)."""
    specs = tuple(_spec_of(x) for x in jax.tree.leaves(state.layers))
    return _decode(
        params,
        state,
        first_logits,
        key,
        plan=plan,
        config=config,
        policy=policy,
        max_new_tokens=max_new_tokens,
        sampler=sampler,
        stop_ids=tuple(stop_ids),
        dtype=dtype,
        implementation=implementation,
        layer_specs=specs,
    )


def _spec_of(x) -> P:
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    if spec is None:
        raise ValueError(f"decode needs the sharded state that kvjax.parallel.prefill returns; got a leaf {x!r}")
    return P(*spec, *([None] * (x.ndim - len(spec))))


@functools.partial(
    jax.jit,
    static_argnames=(
        "plan",
        "config",
        "policy",
        "max_new_tokens",
        "sampler",
        "stop_ids",
        "dtype",
        "implementation",
        "layer_specs",
    ),
)
def _decode(
    params,
    state,
    first_logits,
    key,
    *,
    plan,
    config,
    policy,
    max_new_tokens,
    sampler,
    stop_ids,
    dtype,
    implementation,
    layer_specs,
):
    pol = SeqSharded(policy, plan.axis, plan.prefix_implementation)
    stacked = [_is_stacked(s, plan) for s in layer_specs]
    specs = KVState(layers=jax.tree.unflatten(jax.tree.structure(state.layers), list(layer_specs)), lengths=P())

    def local(params, state, logits, key):
        state = state.replace(layers=_to_local(state.layers, stacked))
        out, n_out, state = gen.decode(
            params,
            state,
            logits,
            key,
            config=config,
            policy=pol,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            stop_ids=stop_ids,
            dtype=dtype,
            implementation=implementation,
        )
        return out, n_out, state.replace(layers=_to_global(state.layers, plan))

    return shard_map(local, mesh=plan.mesh, in_specs=(P(), specs, P(), P()), out_specs=(P(), P(), specs))(
        params, state, first_logits, key
    )
