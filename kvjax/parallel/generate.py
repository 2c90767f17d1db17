"""`generate` for long prompts and large models on many devices (one process or many).

Same inputs and output as `kvjax.generate`, plus a mesh: the parameters are placed by the
sharding rules (tensor parallel over the mesh's "tensor" axis; already placed when the model
was loaded with `kvjax.load(path, mesh=mesh)`), the prompt is padded to a multiple of the
ring's block count, prefilled context-parallel over "seq", and decoded on the sharded state.
With several processes (after `multihost.initialize`) every process calls it with the same
prompts; each one only puts its own shards of the token array on its devices, and every
process gets the full result.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..generation import GenerateOutput, bucket_length, prepare_request
from ..policies.base import Policy
from ..sampling import Sampler
from . import context, multihost
from .layout import padded_length, ring_order
from .tensor import shard_params


def put_prompt(tokens: np.ndarray, lengths: np.ndarray, plan: context.Plan):
    """Host tokens [B, W] (natural order) -> (global tokens in ring order sharded over the
    ring axis, global lengths); each process loads only its own shards."""
    order = ring_order(tokens.shape[1], plan.size, plan.layout)
    tok_sh = NamedSharding(plan.mesh, P(None, plan.axis))
    toks = multihost.global_array(lambda idx: tokens[idx[0]][:, order[idx[1]]], tokens.shape, np.int32, tok_sh)
    lens = multihost.global_array(lambda idx: lengths[idx], lengths.shape, np.int32, NamedSharding(plan.mesh, P()))
    return toks, lens


def generate(
    model,
    prompts: str | Sequence[str],
    *,
    mesh: Mesh,
    policy: Policy | str = "dense",
    max_new_tokens: int = 64,
    sampler: Sampler = Sampler(),
    seed: int = 0,
    chat: bool = False,
    stop_ids: Sequence[int] | None = None,
    axis: str = "seq",
    layout: str = "zigzag",
    prefix_implementation: str | None = None,
    implementation: str | None = None,
    timeout_s: float | None = None,
    kernel: str | None = None,
) -> GenerateOutput:
    """Context- and tensor-parallel `kvjax.generate` over mesh axes `axis` and "tensor" (see module
    doc). implementation:
    `attend`'s; prefix_implementation: the ring's zigzag prefix blocks (`Plan`; `kernel=` is its
    deprecated name). `timeout_s` bounds each phase when several processes run
    (`multihost.peer_guard`)."""
    plan = context.Plan(mesh, axis, layout, prefix_implementation, kernel)
    pol, ids, _ = prepare_request(model, prompts, policy, max_new_tokens, chat)
    cfg = model.config
    longest = max(len(t) for t in ids)
    width = padded_length(bucket_length(longest), plan.size, plan.layout)
    tokens = np.full((len(ids), width), cfg.pad_id, np.int32)
    for i, t in enumerate(ids):
        tokens[i, : len(t)] = t
    lengths = np.asarray([len(t) for t in ids], np.int32)
    toks, lens = put_prompt(tokens, lengths, plan)
    params, cfg = shard_params(model.params, cfg, mesh)
    stops = tuple(stop_ids) if stop_ids is not None else tuple(model.tokenizer.eos_ids)
    common = dict(
        plan=plan,
        config=cfg,
        policy=pol,
        max_new_tokens=max_new_tokens,
        dtype=model.dtype,
        implementation=implementation,
    )
    t0 = time.perf_counter()
    with multihost.peer_guard("prefill", timeout_s):
        logits, state = context.prefill(params, toks, lens, ordered=True, **common)
        jax.block_until_ready(logits)
    t1 = time.perf_counter()
    kv_after_prefill = state.nbytes
    with multihost.peer_guard("decode", timeout_s):
        key = multihost.replicate(jax.random.key_data(jax.random.key(seed)), mesh)
        out, n_out, state = context.decode(
            params, state, logits, jax.random.wrap_key_data(key), sampler=sampler, stop_ids=stops, **common
        )
        out, n_out = multihost.to_numpy(out), multihost.to_numpy(n_out)
    t2 = time.perf_counter()
    texts = [model.tokenizer.decode(out[i, : n_out[i]]) for i in range(len(ids))]
    stats = {
        "prompt_tokens": int(lengths.sum()),
        "prefill_s": t1 - t0,
        "decode_s": t2 - t1,
        "prefill_tokens_per_s": float(lengths.sum()) / max(t1 - t0, 1e-9),
        "decode_tokens_per_s": max(int(n_out.sum()) - len(ids), 0) / max(t2 - t1, 1e-9),
        "generated_tokens": int(n_out.sum()),
        "kv_bytes": state.nbytes,
        "kv_bytes_after_prefill": kv_after_prefill,
        "dense_kv_bytes": int(lengths.max()) * len(ids) * cfg.kv_bytes_per_token(jnp.dtype(model.dtype).itemsize),
        "policy": pol.spec(),
        "devices": int(mesh.devices.size),
        "seq_shards": plan.size,
        "tensor_shards": plan.tensor_size,
        "processes": jax.process_count(),
    }
    return GenerateOutput(texts, out, n_out, state, stats)
