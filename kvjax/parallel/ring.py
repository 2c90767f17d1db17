"""Ring attention over one mesh axis.

Papers: Li et al. 2021, "Sequence Parallelism: Long Sequence Training from System
Perspective" (ring self-attention); Liu et al. 2023, "Ring Attention with Blockwise
Transformers"; Brandon et al. 2023, "Striped Attention" (causal load balance).

Each of the n shards holds a block of queries and a block of K/V slots. For n steps the
K/V block (with its slot positions) moves one shard along the ring with `lax.ppermute`;
the shift for the next step is issued before the current block is computed, so transfer
overlaps compute. Partial results merge through their log-sum-exp
(`kvjax.attention.merge_partials`). Visibility comes from positions, so any token order
is exact; with the zigzag order whole blocks are invisible and are skipped.

Two schedules:
- "positions" (any layout, any `implementation` of `attend`): per step the shard tests the
  position ranges and runs one of: nothing / all queries x first half of the keys /
  second half of the queries x all keys / everything.
- "zigzag" (with `prefix_implementation=`): the shard index decides the same blocks statically
  and each block runs on a prefix-length implementation ("reference", "pallas" or "cudnn":
  `kvjax.parallel.kernels`). Contract: the keys are the queries' own tokens in zigzag order
  (self-attention over a right-padded prompt), i.e. k_pos[:, :, :T] == q_pos; slots beyond T
  are empty. `kernel=` is the deprecated name of `prefix_implementation=`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from .. import attention
from ..attention import AttentionOutput
from . import kernels
from .layout import check_layout, inverse_order, padded_length, ring_order
from .mesh import logical_spec, require_axis, shard_map

_FAR = jnp.iinfo(jnp.int32).max // 2  # a position later than any real one


def axis_size(axis: str) -> int:
    """Static size of a named mesh axis inside shard_map."""
    if hasattr(lax, "axis_size"):
        return int(lax.axis_size(axis))
    return int(lax.psum(1, axis))  # pragma: no cover - older JAX


def _shift(tree, axis: str, n: int):
    perm = [(j, (j + 1) % n) for j in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis, perm), tree)


def _empty(q):
    b, t, nq, h = q.shape
    return jnp.zeros((b, t, nq, h), jnp.float32), jnp.full((b, t, nq), -jnp.inf, jnp.float32)


def _pad_front(o, l, t):
    """Partial result for the last queries only -> full length t (front rows see nothing)."""
    b, tb, nq, h = o.shape
    o = jnp.concatenate([jnp.zeros((b, t - tb, nq, h), jnp.float32), o.astype(jnp.float32)], axis=1)
    l = jnp.concatenate([jnp.full((b, t - tb, nq), -jnp.inf, jnp.float32), l.astype(jnp.float32)], axis=1)
    return o, l


def _positions_block(q, q_pos, k, v, k_pos, *, window, scale, implementation):
    """One ring step of the "positions" schedule: skips blocks the positions rule out."""
    t, s = q.shape[1], k.shape[2]

    def run(qq, qp, kk, vv, kp):
        r = attention.attend(qq, kk, vv, qp, kp, window=window, scale=scale, implementation=implementation)
        return r.out.astype(jnp.float32), r.lse.astype(jnp.float32)

    if t < 2 or s < 2:
        return run(q, q_pos, k, v, k_pos)
    th, sh = t // 2, s // 2
    kp = jnp.where(k_pos >= 0, k_pos, _FAR)
    qmax, qmax_front = jnp.max(q_pos), jnp.max(q_pos[:, :th])
    kmin, kmin_back = jnp.min(kp), jnp.min(kp[:, :, sh:])
    branch = jnp.where(kmin > qmax, 0, jnp.where(kmin_back > qmax, 1, jnp.where(qmax_front < kmin, 2, 3)))
    branches = [
        lambda: _empty(q),
        lambda: run(q, q_pos, k[:, :, :sh], v[:, :, :sh], k_pos[:, :, :sh]),
        lambda: _pad_front(*run(q[:, th:], q_pos[:, th:], k, v, k_pos), t),
        lambda: run(q, q_pos, k, v, k_pos),
    ]
    return lax.switch(branch, branches)


def _zigzag_block(step, q, q_pos, k, v, k_pos, *, i, n, scale, prefix_implementation):
    """One ring step of the "zigzag" schedule (see module doc for the contract)."""
    t = q.shape[1]
    c = t // 2
    q_len = jnp.sum(q_pos >= 0, axis=1)

    def run(qq, ql, kk, vv, kp, causal):
        kv_len = jnp.sum(kp[:, 0] >= 0, axis=1)
        return kernels.prefix_attention(
            qq, kk, vv, ql, kv_len, causal=causal, scale=scale, implementation=prefix_implementation
        )

    def as_f32(o, l):
        return o.astype(jnp.float32), l

    if isinstance(step, int) and step == 0:  # the shard's own block (a Python 0, never traced)
        return as_f32(*run(q, q_len, k, v, k_pos, True))
    src = (i - step) % n
    q_len_back = jnp.sum(q_pos[:, c:] >= 0, axis=1)
    early = lambda: as_f32(*run(q, q_len, k[:, :, :c], v[:, :, :c], k_pos[:, :, :c], False))
    late = lambda: _pad_front(*run(q[:, c:], q_len_back, k, v, k_pos, False), t)
    return lax.cond(src < i, early, late)


def _mass(q, q_pos, lse, k, k_pos, window, scale):
    """Softmax mass [B, N, S] that queries with global log-sum-exp `lse` give slots k."""
    b, t, nq, _ = q.shape
    n = k.shape[1]
    logits = attention.attention_logits(q, k, scale)  # [B, N, G, T, S]
    mask = attention.visibility_mask(q_pos, k_pos, window)[:, :, None]
    l = jnp.transpose(lse.reshape(b, t, n, nq // n), (0, 2, 3, 1))[..., None]
    p = jnp.where(mask & jnp.isfinite(l), jnp.exp(logits - jnp.where(jnp.isfinite(l), l, 0.0)), 0.0)
    return jnp.sum(p, axis=(2, 3))


def _ring_loop(n: int, axis: str, blk, acc, visit):
    """acc = visit(step, blk_step, acc) for step = 0..n-1, where blk_step is the block of
    shard (i - step) mod n. Each shift is issued before the visit of the current block;
    the middle steps run in a fori_loop so the program does not grow with n."""
    nxt = _shift(blk, axis, n) if n > 1 else None
    acc = visit(0, blk, acc)
    if n > 2:

        def body(step, carry):
            blk, acc = carry
            nxt = _shift(blk, axis, n)
            return nxt, visit(step, blk, acc)

        nxt, acc = lax.fori_loop(1, n - 1, body, (nxt, acc))
    if n > 1:
        acc = visit(n - 1, nxt, acc)
    return acc


def ring_attention_local(
    q,
    k,
    v,
    q_pos,
    k_pos,
    *,
    axis: str = "seq",
    window: int | None = None,
    scale: float | None = None,
    want_mass: bool = False,
    implementation=None,
    prefix_implementation: str | None = None,
    kernel: str | None = None,
) -> AttentionOutput:
    """Ring attention for the shard this code runs on (call inside shard_map over `axis`).

    q [B, T, Nq, H], q_pos [B, T]: this shard's queries; k, v [B, N, S, H], k_pos [B, N, S]:
    this shard's cache slots. prefix_implementation=None: "positions" schedule over
    `attend(implementation)`; "reference" | "pallas" | "cudnn": "zigzag" schedule (module doc).
    Returns AttentionOutput(out [B, T, Nq, H], lse [B, T, Nq] float32, key_mass [B, N, S] | None)."""
    prefix_implementation = kernels.resolve_prefix_implementation(prefix_implementation, kernel, optional=True)
    n = axis_size(axis)
    t = q.shape[1]
    if prefix_implementation is not None:
        if window is not None:
            raise ValueError(
                f"prefix_implementation={prefix_implementation!r} has no sliding window; got window={window}"
            )
        if t % 2 or k.shape[2] < t:
            raise ValueError(f"the zigzag schedule needs an even query block and >= T slots; got T={t}, S={k.shape[2]}")
        k, v, k_pos = k[:, :, :t], v[:, :, :t], k_pos[:, :, :t]
        i = lax.axis_index(axis)
        step_fn = functools.partial(_zigzag_block, i=i, n=n, scale=scale, prefix_implementation=prefix_implementation)
    else:

        def step_fn(step, q, q_pos, k, v, k_pos):
            return _positions_block(q, q_pos, k, v, k_pos, window=window, scale=scale, implementation=implementation)

    def visit(step, blk, acc):
        o, l = step_fn(step, q, q_pos, *blk)
        return tuple(attention.merge_partials([acc[0], o], [acc[1], l]))

    acc_o, acc_l = _ring_loop(n, axis, (k, v, k_pos), _empty(q), visit)
    mass = None
    if want_mass:  # second pass: the queries (with their global lse) visit every shard's slots
        mass = _ring_loop(
            n,
            axis,
            (q, q_pos, acc_l),
            jnp.zeros(k_pos.shape, jnp.float32),
            lambda step, vis, m: m + _mass(*vis, k, k_pos, window, scale),
        )
    return AttentionOutput(acc_o.astype(q.dtype), acc_l, mass)


def _check_divisible(name: str, size: int, axis: str | None, mesh) -> None:
    if axis is not None and size % mesh.shape[axis]:
        raise ValueError(f"{name}={size} must be a multiple of the mesh axis {axis!r} of size {mesh.shape[axis]}")


@functools.partial(
    jax.jit,
    static_argnames=(
        "mesh",
        "axis",
        "causal",
        "layout",
        "window",
        "scale",
        "want_mass",
        "implementation",
        "prefix_implementation",
        "kernel",
    ),
)
def ring_attention(
    q,
    k,
    v,
    q_pos,
    k_pos,
    *,
    mesh,
    axis: str = "seq",
    causal: bool = True,
    layout: str = "zigzag",
    window: int | None = None,
    scale: float | None = None,
    want_mass: bool = False,
    implementation=None,
    prefix_implementation: str | None = None,
    kernel: str | None = None,
) -> AttentionOutput:
    """Attention of q [B, T, Nq, H] over k, v [B, N, S, H] (natural token order, positions
    q_pos [B, T], k_pos [B, N, S]; -1 = padding), computed as a ring over mesh axis `axis`.

    The sequences are padded (with position -1) to a multiple of the layout's block count,
    reordered by `layout`, sharded, and the result is put back in the original order.
    causal=False lets every valid query see every valid key. Batch and heads are sharded
    too when the mesh has the axes AXIS_RULES maps "batch" and "heads"/"kv_heads" to.
    implementation: `attend`'s (the positions schedule's blocks); prefix_implementation: None, or
    the zigzag schedule's prefix-block implementation (module doc; `kernel=` is its deprecated name).
    Same result as `kvjax.attention.attend` (returns AttentionOutput)."""
    prefix_implementation = kernels.resolve_prefix_implementation(prefix_implementation, kernel, optional=True)
    n = require_axis(mesh, axis)
    check_layout(layout)
    if not causal and window is not None:
        raise ValueError(f"window={window} needs causal=True")
    if prefix_implementation is not None and (layout != "zigzag" or not causal or q.shape[1] != k.shape[2]):
        raise ValueError(
            f"prefix_implementation={prefix_implementation!r} needs layout='zigzag', causal=True and "
            f"self-attention (T == S); got layout={layout!r}, causal={causal}, T={q.shape[1]}, S={k.shape[2]}"
        )
    b, t, nq, _h = q.shape
    s = k.shape[2]
    if not causal:
        q_pos = jnp.where(q_pos >= 0, _FAR, -1).astype(jnp.int32)
    tp, sp = padded_length(t, n, layout), padded_length(s, n, layout)
    q = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    q_pos = jnp.pad(q_pos, ((0, 0), (0, tp - t)), constant_values=-1)
    k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - s), (0, 0)))
    k_pos = jnp.pad(k_pos, ((0, 0), (0, 0), (0, sp - s)), constant_values=-1)
    qo, so = ring_order(tp, n, layout), ring_order(sp, n, layout)
    q, q_pos = q[:, qo], q_pos[:, qo]
    k, v, k_pos = k[:, :, so], v[:, :, so], k_pos[:, :, so]

    rules = None if axis == "seq" else _rules_with_seq(axis)
    q_spec = logical_spec(("batch", "seq", "heads", None), mesh, rules)
    k_spec = logical_spec(("batch", "kv_heads", "seq", None), mesh, rules)
    _check_divisible("batch", b, q_spec[0], mesh)
    _check_divisible("num_heads", nq, q_spec[2], mesh)
    _check_divisible("num_kv_heads", k.shape[1], k_spec[1], mesh)
    qp_spec, kp_spec, lse_spec = P(*q_spec[:2]), P(*k_spec[:3]), P(*q_spec[:3])

    def local(*args):
        r = ring_attention_local(
            *args,
            axis=axis,
            window=window,
            scale=scale,
            want_mass=want_mass,
            implementation=implementation,
            prefix_implementation=prefix_implementation,
        )
        return (r.out, r.lse, r.key_mass) if want_mass else (r.out, r.lse)

    out_specs = (q_spec, lse_spec, kp_spec) if want_mass else (q_spec, lse_spec)
    res = shard_map(local, mesh=mesh, in_specs=(q_spec, k_spec, k_spec, qp_spec, kp_spec), out_specs=out_specs)(
        q, k, v, q_pos, k_pos
    )
    qi, si = inverse_order(qo), inverse_order(so)
    out, lse = res[0], res[1]
    mass = res[2][:, :, si][:, :, :s] if want_mass else None
    return AttentionOutput(out[:, qi][:, :t], lse[:, qi][:, :t], mass)


def _rules_with_seq(axis: str) -> dict:
    from .mesh import AXIS_RULES

    return {**AXIS_RULES, "seq": axis, "kv_seq": axis}
