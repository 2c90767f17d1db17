"""Peak-performance and memory calculator for long-context serving.

After Fu, "Challenges in Deploying Long-Context Transformers: A Theoretical Peak Performance
Analysis" (2024): with a model of P parameters, a context of L tokens and a KV cache of
`kv(L)` bytes per user on a device of HBM capacity M, compute rate F and bandwidth W,
  * concurrency:   users = floor((M - weight_bytes) / kv(L))
  * prefill:       t_prefill ~ (2 P L + 2 n_layers L^2 d_attn) / (F * mfu)   (compute bound)
  * decode step:   t_decode  ~ (weight_bytes + users * read(L)) / (W * mbu)    (memory bound)
  * context switch: moving one user's cache over the host link, kv(L) / pcie.
kv(L) is what the cache holds, read(L) what one decode step reads of it: the same for a dense,
evicted or quantized cache, a fraction of it for the retrieval policies (Quest reads its page
bounds and the selected pages, A^2ATS its codes and the selected tokens). Both are exact for any
kvjax policy: `kv_cache_bytes` / `kv_read_bytes` trace the policy's prefill with
`jax.eval_shape` (no weights allocated, nothing computed), so compressed, quantized, per-layer
and per-head layouts are counted as they really are stored (`KVState.kv_bytes_read_per_step`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from .models.config import LlamaConfig


@dataclasses.dataclass(frozen=True)
class Device:
    """Datasheet peaks: bf16 dense FLOP/s, HBM bytes/s, HBM bytes, host link bytes/s."""

    name: str
    flops: float
    bandwidth: float
    memory: float
    host_link: float


DEVICES = {
    d.name: d
    for d in (
        Device("h100", 989e12, 3.35e12, 80e9, 64e9),
        Device("h200", 989e12, 4.8e12, 141e9, 64e9),
        Device("a100", 312e12, 2.0e12, 80e9, 32e9),
        Device("l4", 121e12, 0.3e12, 24e9, 32e9),
        Device("t4", 65e12, 0.32e12, 16e9, 16e9),
        Device("tpu-v5e", 197e12, 0.82e12, 16e9, 32e9),
        Device("tpu-v5p", 459e12, 2.76e12, 95e9, 32e9),
    )
}


def get_device(name: str) -> Device:
    try:
        return DEVICES[name]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; expected one of {sorted(DEVICES)}") from None


def kv_cache_bytes(
    config: LlamaConfig, policy, context: int, batch: int = 1, max_new_tokens: int = 0, dtype=jnp.bfloat16
) -> int:
    """Bytes of the KV state `policy` holds after prefilling `batch` prompts of `context`
    tokens (with room for `max_new_tokens`), from shapes alone."""
    state = _prefill_state(config, policy, context, batch, max_new_tokens, dtype)
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(state.layers)))


def kv_read_bytes(
    config: LlamaConfig, policy, context: int, batch: int = 1, max_new_tokens: int = 0, dtype=jnp.bfloat16
) -> int:
    """Bytes of the KV state one decode step reads after prefilling `batch` prompts of `context`
    tokens (`KVState.kv_bytes_read_per_step`), from shapes alone."""
    return _prefill_state(config, policy, context, batch, max_new_tokens, dtype).kv_bytes_read_per_step


def kv_host_bytes(
    config: LlamaConfig, policy, context: int, batch: int = 1, max_new_tokens: int = 0, dtype=jnp.bfloat16
) -> tuple[int, int]:
    """(bytes the state keeps in host memory, bytes one decode step copies from there) for a
    policy with host-resident leaves (`kvjax.host`: ShadowKV's values, offloaded blocks; 0, 0
    for the others), from shapes alone."""
    state = _prefill_state(config, policy, context, batch, max_new_tokens, dtype)
    return state.host_bytes, state.host_bytes_read_per_step


@functools.lru_cache(maxsize=64)
def _prefill_state(config: LlamaConfig, policy, context: int, batch: int, max_new_tokens: int, dtype):
    """The KVState (of `jax.ShapeDtypeStruct`s) a prefill of `batch` x `context` tokens leaves."""
    from .generation import prefill
    from .models import init_params

    if context < 1 or batch < 1:
        raise ValueError(f"context={context} and batch={batch} must be >= 1")
    params = jax.eval_shape(lambda k: init_params(config, k, dtype), jax.random.key(0))
    tokens = jax.ShapeDtypeStruct((batch, context), jnp.int32)
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    _, state = jax.eval_shape(
        functools.partial(
            prefill.__wrapped__ if hasattr(prefill, "__wrapped__") else prefill,
            config=config,
            policy=policy,
            max_new_tokens=max_new_tokens,
            dtype=dtype,
        ),
        params,
        tokens,
        lengths,
    )
    return state


def serving_estimate(
    config: LlamaConfig,
    policy,
    context: int,
    device: Device | str,
    *,
    users: int | None = None,
    weight_bytes_per_param: float = 2.0,
    mfu: float = 0.5,
    mbu: float = 0.8,
) -> dict:
    """Memory, concurrency, prefill and decode times for `context`-token users on `device`.
    Concurrency counts the bytes each user's cache holds in device memory; the decode step, the
    bytes one step reads from device memory (weights + users x the device part of
    `kv_read_bytes`) plus, for policies with host-resident leaves, a host-link term: users x
    the bytes one step copies from host memory / the host link's rate, added to the step (no
    overlap of copy and compute assumed).

    users: how many users decode together (default: as many as fit). mfu / mbu: the
    achievable fractions of peak compute and bandwidth (the paper's defaults are peaks;
    measured kvjax numbers are in BENCHMARKS.md). Returns a dict of plain numbers."""
    dev = get_device(device) if isinstance(device, str) else device
    if not 0 < mfu <= 1 or not 0 < mbu <= 1:
        raise ValueError(f"mfu={mfu} and mbu={mbu} must be in (0, 1]")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r} must be an integer >= 1 (tokens per user)")
    if context > config.max_position:
        raise ValueError(f"context={context} exceeds {config.name}'s max_position={config.max_position}")
    if users is not None and (isinstance(users, bool) or not isinstance(users, int) or users < 1):
        raise ValueError(f"users={users!r} must be an integer >= 1, or None (as many as fit)")
    weights = config.num_params() * weight_bytes_per_param
    kv = kv_cache_bytes(config, policy, context)
    read = kv_read_bytes(config, policy, context)
    host_kv, host_read = kv_host_bytes(config, policy, context)
    dev_kv = kv - host_kv
    free = dev.memory - weights
    fit = int(free // dev_kv) if free > 0 else 0
    n = fit if users is None else users
    attn_dim = config.num_heads * config.head_dim
    prefill_flops = 2 * config.num_params() * context + 2 * config.num_layers * context**2 * attn_dim
    decode_bytes = weights + n * (read - host_read)  # weights once, then each user's cache as a step reads it
    step_s = decode_bytes / (dev.bandwidth * mbu) + n * host_read / dev.host_link
    return {
        "model": config.name,
        "policy": policy.spec(),
        "device": dev.name,
        "context": context,
        "weight_bytes": weights,
        "kv_bytes_per_user": kv,
        "kv_bytes_per_token": kv / context,
        "kv_read_bytes_per_user": read,
        "kv_read_bytes_per_token": read / context,
        "kv_device_bytes_per_user": dev_kv,
        "kv_host_bytes_per_user": host_kv,
        "host_read_bytes_per_user": host_read,
        "max_users": fit,
        "users": n,
        "fits": weights + n * dev_kv <= dev.memory,
        "prefill_s": prefill_flops / (dev.flops * mfu),
        "host_link_step_s": n * host_read / dev.host_link,
        "decode_step_s": step_s,
        "decode_tokens_per_s": n / step_s if n else 0.0,
        "context_switch_s": dev_kv / dev.host_link,
    }
