"""Host-resident state leaves: KV data kept in host memory and fetched a few rows at a time.

A layer state may keep leaves in host memory through JAX's memory kinds (`pinned_host`; see
the JAX guide "Memories and host offloading"): ShadowKV's values, the offload policy's
blocks. Such a leaf is written while the prompt is prefilled and only read while decoding:

- placement: `zeros` (made by a host computation) in `init_layer`, `to_host(x)`
  (`jax.device_put(x, jax.memory.Space.Host)`, inside or outside `jit`) in the final prefill
  chunk, so a prefill's output carries the memory kind (`x.sharding.memory_kind ==
  "pinned_host"`) as out_shardings would give it;
- reads: `take_along_axis` / `slice_tokens` run the gather or slice where the leaf lives (on
  the host, in a host computation: `compute_on`, compute type "device_host", the indices
  copied there first) and move only the selected rows to the device; a whole host leaf is
  never copied to the device;
- writes (prefill only): `write` runs the `dynamic_update_slice` on the host;
- the decode loop (`kvjax.generation.steps`) takes host leaves out of the `while_loop` carry
  (`split_host`): they are loop-invariant operands, never carried and rewritten.

Every helper also takes a device-resident leaf and then does the plain device operation, so a
state placed on the device (`offload="device"`, or a backend without a host memory kind) or a
program lowered from shapes alone (`jax.eval_shape` results carry no memory kind) runs the
same code. On CPU host and device memory are the same RAM: the placement, the host
computations and the copies run as they would on a GPU, at no cost.

`placement(offload, who)` resolves a policy's `offload` parameter: "host" (host memory, a
PolicyError where the backend has no host memory kind), "device" (keep everything on the
device), "auto" (host where the backend has a host memory kind, else the device: the
documented fallback).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

try:  # jax 0.10: the function transform is `compute_on2` (`compute_on` a context manager)
    from jax.experimental.compute_on import compute_on2 as _compute_on
except ImportError:  # jax 0.11: the same transform under the name `compute_on`
    from jax.experimental.compute_on import compute_on as _compute_on


#: The memory kind host leaves use (JAX's page-locked host memory, what fast copies need).
HOST_KIND = "pinned_host"
HOST_KINDS = ("pinned_host", "unpinned_host")
OFFLOAD_CHOICES = ("auto", "host", "device")


def host_memory_kind(device=None) -> str | None:
    """`HOST_KIND` when `device` (default: the first device) has that memory, else None."""
    device = device or jax.devices()[0]
    try:
        kinds = {m.kind for m in device.addressable_memories()}
    except Exception:  # a backend without memory kinds
        return None
    return HOST_KIND if HOST_KIND in kinds else None


def placement(offload: str, who: str) -> bool:
    """True when a policy with `offload` places its host leaves in host memory (module doc).
    Raises ValueError for an unknown choice, and for "host" on a backend without host memory."""
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"{who}: offload={offload!r}; expected one of {OFFLOAD_CHOICES}")
    if offload == "device":
        return False
    kind = host_memory_kind()
    if kind is None and offload == "host":
        raise ValueError(
            f"{who}: offload='host' needs a host memory kind ({HOST_KIND!r}), which the "
            f"{jax.default_backend()!r} backend does not offer; use offload='auto' (keeps the leaves on the device "
            "there) or offload='device'"
        )
    return kind is not None


def is_host(x) -> bool:
    """True for an array, tracer or ShapeDtypeStruct that lives in host memory."""
    if isinstance(x, jax.ShapeDtypeStruct):
        sharding = getattr(x, "sharding", None)
        return getattr(sharding, "memory_kind", None) in HOST_KINDS
    try:
        return jax.typeof(x).memory_space == jax.memory.Space.Host
    except (TypeError, AttributeError):
        return False


def to_host(x: jax.Array) -> jax.Array:
    """x placed in host memory (inside `jit` too)."""
    return jax.device_put(x, jax.memory.Space.Host)


def zeros(shape, dtype) -> jax.Array:
    """A zero array made in host memory by a host computation (no device buffer of that size in
    between, as `to_host(jnp.zeros(...))` would have)."""
    return _on_host(lambda: jnp.zeros(shape, dtype))


def _on_host(fn, *args) -> jax.Array:
    """fn(*args) computed on the host (XLA's "device_host" compute type), its output left in
    host memory. The arguments must already be there."""
    return _compute_on(fn, compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)(*args)


def to_device(x: jax.Array) -> jax.Array:
    """x placed in device memory (a no-op for a device array)."""
    return jax.device_put(x, jax.memory.Space.Device) if is_host(x) else x


def take_along_axis(x: jax.Array, idx: jax.Array, axis: int) -> jax.Array:
    """`jnp.take_along_axis(x, idx, axis)` on the device: for a host leaf x the gather runs
    on the host (the indices copied there) and only its result, idx-sized, comes to the
    device. Indices must be in range (clip them; mask what they point to afterwards)."""
    if not is_host(x):
        return jnp.take_along_axis(x, idx, axis=axis)
    out = _on_host(lambda x, i: jnp.take_along_axis(x, i, axis=axis, mode="promise_in_bounds"), x, to_host(idx))
    return to_device(out)


def slice_tokens(x: jax.Array, start, size: int, axis: int = 2) -> jax.Array:
    """x[..., start:start + size, ...] along `axis` (start traced, size static), on the
    device; from a host leaf only the slice is copied."""
    if not is_host(x):
        return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)
    start = to_host(jnp.asarray(start, jnp.int32))
    out = _on_host(lambda x, s: jax.lax.dynamic_slice_in_dim(x, s, size, axis=axis), x, start)
    return to_device(out)


def prefix(x: jax.Array, size: int, axis: int = 2) -> jax.Array:
    """The first `size` entries along `axis`, left where x lives (a host leaf stays on the host)."""
    if size >= x.shape[axis]:
        return x
    if not is_host(x):
        return jax.lax.slice_in_dim(x, 0, size, axis=axis)
    return _on_host(lambda x: jax.lax.slice_in_dim(x, 0, size, axis=axis), x)


def write(buf: jax.Array, update: jax.Array, start, axis: int = 2) -> jax.Array:
    """`buf` with `update` written along `axis` from `start` (scalar), where `buf` lives: a host
    leaf is updated on the host (the update copied there) and stays there."""
    start = jnp.asarray(start, jnp.int32)
    update = update.astype(buf.dtype)
    if not is_host(buf):
        return jax.lax.dynamic_update_slice_in_dim(buf, update, start, axis=axis)
    fn = lambda b, u, s: jax.lax.dynamic_update_slice_in_dim(b, u, s, axis=axis)
    return _on_host(fn, buf, to_host(update), to_host(start))


def split_host(tree):
    """Split a pytree's leaves into (device leaves, host leaves, join): join(device, host)
    rebuilds the tree. The decode loop carries only the device leaves; the host leaves are
    loop-invariant operands (read-only while decoding)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    on_host = tuple(is_host(x) for x in leaves)
    dev = [x for x, h in zip(leaves, on_host) if not h]
    hst = [x for x, h in zip(leaves, on_host) if h]

    def join(dev_leaves, host_leaves):
        d, h = iter(dev_leaves), iter(host_leaves)
        return jax.tree_util.tree_unflatten(treedef, [next(h) if m else next(d) for m in on_host])

    return dev, hst, join


def unchanged_host_leaves(tree, host_leaves) -> bool:
    """True when `tree`'s host leaves are exactly (the same traced values as) `host_leaves`:
    what a decode step must return for the loop to keep them out of its carry."""
    _, hst, _ = split_host(tree)
    return len(hst) == len(host_leaves) and all(a is b for a, b in zip(hst, host_leaves))
