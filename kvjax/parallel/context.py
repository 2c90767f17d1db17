"""Context- and tensor-parallel prefill and decode of the whole model over a 2-D mesh.

    logits, state = prefill(params, tokens, lengths, plan=Plan(mesh), config=cfg, policy=p, max_new_tokens=64)
    out, n_out, state = decode(params, state, logits, key, plan=Plan(mesh), config=cfg, policy=p, ...)

The unchanged model (`kvjax.models.forward`) runs inside one `shard_map` over both axes:
- `seq` (the ring): the prompt [B, T] is put in ring order (zigzag by default), sharded along
  T, and the policy is wrapped in `SeqSharded`: every matmul is token-local, attention is a
  ring. Each shard keeps its own tokens' slots (+ decode headroom).
- `tensor`: the parameters are split the Megatron way (`kvjax.parallel.tensor`,
  `param_shardings`) and the model runs with the shard's config (`shard_config`): the shard's
  heads, their KV state and their compression; one psum per row-parallel matmul.
With a ring of one shard the policy runs unwrapped, so every policy works under pure tensor
parallelism; with a longer ring the policies `SeqSharded` accepts.

Global layout of a sharded state (how shards' local states are stitched together): a leaf
of rank >= 3 ([B, N, S, ...], the slot layout of kvjax states) is the concatenation of the
ring shards' leaves along S (axis 2, over `seq`); a leaf of rank >= 2 is the concatenation of
the tensor shards' leaves along axis 1 (KV heads, or a policy's head-major pool, over
`tensor`); a leaf of lower rank than either (counters such as `fill`) gets a leading axis with
one entry per shard of those axes. `KVState.lengths` is replicated, and so is the work over
other mesh axes. `nbytes` of the global state is the memory of all shards together; each ring
shard keeps `max_new_tokens` decode slots (only ring shard 0 fills them).
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
from .tensor import param_specs, shard_config, tensor_size


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static description of a context-parallel run (hashable: a jit static argument).

    axis: ring mesh axis; layout: token order (kvjax.parallel.layout); prefix_implementation: None
    (ring blocks through `attend`) or the zigzag schedule's prefix-block implementation,
    "reference", "pallas" or "cudnn" (`kvjax.parallel.kernels`; `kernel=` is its deprecated name).
    tensor_axis: the tensor-parallel mesh axis (absent or size 1: none)."""

    mesh: Mesh
    axis: str = "seq"
    layout: str = "zigzag"
    prefix_implementation: str | None = None
    kernel: str | None = None  # deprecated name of prefix_implementation (moved there, then None)
    tensor_axis: str = "tensor"

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
    def tensor_size(self) -> int:
        return tensor_size(self.mesh, self.tensor_axis)

    @property
    def ring(self) -> bool:
        """Whether the policy runs wrapped in `SeqSharded` (a ring of several shards, or a
        zigzag prefix implementation asked for)."""
        return self.size > 1 or self.prefix_implementation is not None

    def policy_for(self, policy: Policy, config: LlamaConfig) -> Policy:
        """The policy each shard runs (`SeqSharded(policy)` on a ring)."""
        if not self.ring:
            return policy
        if config.attn_logit_softcap is not None and self.prefix_implementation is not None:
            raise ValueError(
                f"prefix_implementation={self.prefix_implementation!r} has no logit soft-cap; {config.name} caps "
                f"attention logits (attn_logit_softcap={config.attn_logit_softcap}): leave prefix_implementation=None"
            )
        return SeqSharded(policy, self.axis, self.prefix_implementation)

    def local_config(self, config: LlamaConfig) -> LlamaConfig:
        """The config one tensor shard runs with (`kvjax.parallel.tensor.shard_config`)."""
        return shard_config(config, self.tensor_size, self.tensor_axis)

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
def _stack_axes(ndim: int, plan: Plan) -> tuple[str, ...]:
    """Mesh axes over which a local leaf of rank `ndim` is kept once per shard (module doc)."""
    axes = []
    if ndim < 3 and plan.size > 1:
        axes.append(plan.axis)
    if ndim < 2 and plan.tensor_size > 1:
        axes.append(plan.tensor_axis)
    return tuple(axes)


def _leaf_spec(ndim: int, plan: Plan) -> P:
    """Spec of a global leaf built from a local leaf of rank `ndim` (module doc)."""
    dims = [None] * ndim
    if ndim >= 3:
        dims[2] = plan.axis
    if ndim >= 2 and plan.tensor_size > 1:
        dims[1] = plan.tensor_axis
    stack = _stack_axes(ndim, plan)
    if stack:
        return P(stack if len(stack) > 1 else stack[0], *dims)
    return P(*dims) if ndim >= 3 or plan.tensor_size > 1 else P()


def _is_stacked(spec: P) -> bool:
    """A leaf kept once per shard (its leading axis is sharded; a batch axis never is)."""
    return len(spec) > 0 and spec[0] is not None


def _to_global(layers, plan: Plan):
    return jax.tree.map(lambda x: x[None] if _stack_axes(x.ndim, plan) else x, layers)


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
    pol = plan.policy_for(policy, config)
    cfg = plan.local_config(config)
    toks = tokens if ordered else _in_ring_order(tokens, plan)

    def local(params, toks, lengths):
        bl, wl = toks.shape
        idx = plan.local_token_index(wl)
        pos = jnp.where(idx[None, :] < lengths[:, None], idx[None, :], -1)
        state = pol.init_state(cfg, bl, wl, max_new_tokens, dtype)
        ctx = LayerContext(0, cfg, "prefill", True, wl, max_new_tokens, implementation)
        h, state = hidden_states(params, toks, pos, state, config=cfg, policy=pol, ctx=ctx, dtype=dtype)
        here = (pos == (lengths - 1)[:, None])[..., None]
        last = lax.psum(jnp.sum(jnp.where(here, h.astype(jnp.float32), 0.0), axis=1), plan.axis).astype(h.dtype)
        logits = logits_from_hidden(params, last, config=cfg, dtype=dtype)
        return logits, state.replace(lengths=lengths.astype(jnp.int32))

    def local_global(params, toks, lengths):
        logits, state = local(params, toks, lengths)
        return logits, state.replace(layers=_to_global(state.layers, plan))

    in_specs = (param_specs(params, config, plan.mesh), P(None, plan.axis), P())
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
    pol = plan.policy_for(policy, config)
    cfg = plan.local_config(config)
    stacked = [_is_stacked(s) for s in layer_specs]
    specs = KVState(layers=jax.tree.unflatten(jax.tree.structure(state.layers), list(layer_specs)), lengths=P())

    def local(params, state, logits, key):
        state = state.replace(layers=_to_local(state.layers, stacked))
        out, n_out, state = gen.decode(
            params,
            state,
            logits,
            key,
            config=cfg,
            policy=pol,
            max_new_tokens=max_new_tokens,
            sampler=sampler,
            stop_ids=stop_ids,
            dtype=dtype,
            implementation=implementation,
        )
        return out, n_out, state.replace(layers=_to_global(state.layers, plan))

    in_specs = (param_specs(params, config, plan.mesh), specs, P(), P())
    return shard_map(local, mesh=plan.mesh, in_specs=in_specs, out_specs=(P(), P(), specs))(
        params, state, first_logits, key
    )
