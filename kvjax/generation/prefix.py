"""BatchLLM global prefix sharing for batched `generate` (`share_prefixes=`).

Zheng et al., "BatchLLM: Optimizing Large Batched LLM Inference with Global Prefix Sharing
and Throughput-oriented Token Batching" (2024), arXiv:2412.03594. A large batch is known
ahead of time, so its common prefixes can be found globally instead of by an LRU cache:

1. `prefix_tree`: the radix tree of the batch's token ids (each request's last token left
   out, so every request keeps at least one token of its own to produce its first logits).
2. `plan_groups`: BatchLLM's single-level sharing: requests are split into groups, each with
   one shared prefix prefilled once (two levels: prefix + per-request suffix). The grouping
   maximises the reused tokens sum((|group| - 1) * prefix length) exactly, by a dynamic
   programme over the tree (a request may join a group at any ancestor node: sharing a
   shorter prefix with more requests can reuse more than a longer one with fewer, the
   trade-off the paper's MaximizeReuse resolves). Prefixes shorter than `min_prefix` tokens
   are not shared.
3. Each group runs as one batch on a `SharedPrefixKV` state: the prefix is prefilled once
   (one row), the suffixes are prefilled as rows that attend to it, and every decode step
   reads the prefix once for the whole group (`kvjax.policies.shared_prefix`). Requests
   that share nothing run as one ordinary batch. Groups run in BatchLLM's order (larger
   decode-to-prompt ratio first: here, shorter prompts first, as every row decodes the same
   `max_new_tokens`) and results come back in the caller's order.

Greedy outputs equal `generate` without sharing token for token (up to floating-point ties).
The dense cache only: a compression policy decides per row what to keep from the prompt,
so a prefix cannot be shared under one.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..policies.dense import Dense
from ..policies.shared_prefix import SharedPrefix, shared_prefix_state
from ..state import bound_length
from .resume import feed
from .steps import bucket_length, decode, prefill
from .text import cut_at_stop

#: Shortest prefix `share_prefixes=True` shares (tokens).
DEFAULT_MIN_PREFIX = 16


@dataclasses.dataclass
class Node:
    """A radix-tree node: `depth` tokens from the root; `ends`: requests whose (shortened) ids
    end here; `children`: nodes one branching further."""

    depth: int
    ends: list[int]
    children: list[Node]
    plan: tuple = ()  # set by plan_groups: (child splits, group size taken here per count left)


@dataclasses.dataclass(frozen=True)
class PrefixGroup:
    """Requests `rows` (caller's indices) that share their first `prefix_len` tokens."""

    prefix_len: int
    rows: tuple[int, ...]


def prefix_tree(seqs: list[list[int]]) -> Node:
    """The radix tree of token sequences (a node per branching point or sequence end)."""

    def build(idx: list[int], depth: int) -> Node:
        d = depth
        while all(len(seqs[i]) > d for i in idx) and len({seqs[i][d] for i in idx}) == 1:
            d += 1
        ends = [i for i in idx if len(seqs[i]) == d]
        by_token: dict[int, list[int]] = {}
        for i in idx:
            if len(seqs[i]) > d:
                by_token.setdefault(seqs[i][d], []).append(i)
        return Node(d, ends, [build(g, d + 1) for _, g in sorted(by_token.items())])

    return build(list(range(len(seqs))), 0)


def _maxplus(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """c[k] = max_i a[k - i] + b[i] and the best i per k."""
    total = a[:, None] + b[None, :]
    n = len(a) + len(b) - 1
    c = np.full(n, -np.inf)
    arg = np.zeros(n, np.int64)
    for i in range(len(b)):
        seg = total[:, i]
        better = seg > c[i : i + len(a)]
        c[i : i + len(a)] = np.where(better, seg, c[i : i + len(a)])
        arg[i : i + len(a)] = np.where(better, i, arg[i : i + len(a)])
    return c, arg


def plan_groups(ids: list[list[int]], min_prefix: int = DEFAULT_MIN_PREFIX) -> list[PrefixGroup]:
    """Groups of requests with one shared prefix each, maximising the reused prefill tokens
    (module doc). Requests in no group share nothing worth `min_prefix` tokens."""
    if min_prefix < 1:
        raise ValueError(f"min_prefix={min_prefix!r} must be >= 1")
    root = prefix_tree([list(x[:-1]) for x in ids])
    groups: list[PrefixGroup] = []

    # H[v][k]: best reuse inside v's subtree with k requests left for an ancestor's group.
    def solve(v: Node):
        conv = np.full(len(v.ends) + 1, -np.inf)
        conv[len(v.ends)] = 0.0
        splits = []
        for c in v.children:
            hc = solve(c)
            conv, arg = _maxplus(conv, hc)
            splits.append(arg)
        best = conv.copy()  # j = 0: nobody groups here
        take = np.zeros(len(conv), np.int64)
        if v.depth >= min_prefix:
            for j in range(2, len(conv)):  # a group of j here: best[k - j] from conv[k]
                gain = conv[j:] + (j - 1) * v.depth
                better = gain > best[: len(gain)]
                best[: len(gain)] = np.where(better, gain, best[: len(gain)])
                take[: len(gain)] = np.where(better, j, take[: len(gain)])
        v.plan = (splits, take)
        return best

    def resolve(v: Node, left: int) -> list[int]:
        splits, take = v.plan
        j = int(take[left])
        k = left + j
        pools = []
        for c, arg in zip(reversed(v.children), reversed(splits)):
            kc = int(arg[k])
            pools.append(resolve(c, kc))
            k -= kc
        pool = list(v.ends) + [i for p in reversed(pools) for i in p]
        if j >= 2:
            groups.append(PrefixGroup(v.depth, tuple(sorted(pool[:j]))))
            pool = pool[j:]
        return pool

    h = solve(root)
    resolve(root, int(np.argmax(h)))
    return groups


def reused_tokens(groups: list[PrefixGroup]) -> int:
    """Prefill tokens the groups save: (|rows| - 1) * prefix_len each."""
    return sum((len(g.rows) - 1) * g.prefix_len for g in groups)


def _compiled(fn, args, static):
    t0 = time.perf_counter()
    exe = fn.lower(*args, **static).compile()
    return exe, time.perf_counter() - t0


def _padded(rows: list[list[int]], width: int, pad: int) -> np.ndarray:
    out = np.full((len(rows), width), pad, np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def generate_shared(model, req, implementation, min_prefix: int):
    """`generate` for a checked `Request` with global prefix sharing (module doc). Returns
    (tokens [B, max_new_tokens], n_tokens [B], texts, states, stats)."""
    opts, cfg = req.options, model.config
    if not isinstance(opts.policy, Dense):
        raise ValueError(
            f"share_prefixes needs the dense cache (policy='dense'), not {opts.policy.spec()!r}: a compression "
            "policy decides per row what to keep of the prompt, so a prefix cannot be shared under it"
        )
    n_rows, n_new, bucket = len(req.ids), opts.max_new_tokens, opts.new_tokens_bucket
    groups = plan_groups(req.ids, min_prefix)
    grouped = {r for g in groups for r in g.rows}
    singles = [r for r in range(n_rows) if r not in grouped]
    order = sorted(groups, key=lambda g: np.mean([len(req.ids[r]) for r in g.rows]))
    jobs = [(g.prefix_len, list(g.rows)) for g in order] + ([(0, singles)] if singles else [])
    out = np.full((n_rows, n_new), cfg.pad_id, np.int32)
    n_out = np.zeros(n_rows, np.int32)
    times = dict(prefill_s=0.0, decode_s=0.0, prefill_compile_s=0.0, decode_compile_s=0.0)
    common = dict(config=cfg, dtype=model.dtype, implementation=implementation)
    states, prefilled = [], 0

    def timed(fn, args, static, key):
        exe, c = _compiled(fn, args, static)
        times[key + "_compile_s"] += c
        t0 = time.perf_counter()
        res = jax.block_until_ready(exe(*args))
        times[key + "_s"] += time.perf_counter() - t0
        return res

    for d, rows in jobs:
        ids = [req.ids[r] for r in rows]
        if d == 0:  # no shared prefix: an ordinary batch
            width = bucket_length(max(len(x) for x in ids))
            lens = np.asarray([len(x) for x in ids], np.int32)
            args = (model.params, jnp.asarray(_padded(ids, width, cfg.pad_id)), jnp.asarray(lens))
            static = dict(policy=opts.policy, max_new_tokens=bucket, longest=bound_length(int(lens.max()), width))
            logits, state = timed(prefill, args, {**static, **common}, "prefill")
            policy = opts.policy
            prefilled += int(lens.sum())
        else:
            width = bucket_length(d)
            args = (model.params, jnp.asarray(_padded([ids[0][:d]], width, cfg.pad_id)), jnp.asarray([d], jnp.int32))
            static = dict(policy=Dense(), max_new_tokens=0, longest=bound_length(d, width))
            _, pre = timed(prefill, args, {**static, **common}, "prefill")
            suffix = [x[d:] for x in ids]
            lens = np.asarray([len(x) for x in suffix], np.int32)
            sw = bucket_length(int(lens.max()), minimum=16)
            policy = SharedPrefix()
            state = shared_prefix_state(pre, len(rows), sw + bucket)
            cols = np.arange(sw)[None]
            pos = np.where(cols < lens[:, None], d + cols, -1).astype(np.int32)
            args = (
                model.params,
                state,
                jnp.asarray(_padded(suffix, sw, cfg.pad_id)),
                jnp.asarray(pos),
                jnp.asarray(lens - 1, jnp.int32),
            )
            static = dict(policy=policy, phase="prefill", chunked=True)
            logits, state = timed(feed, args, {**static, **common}, "prefill")
            prefilled += d + int(lens.sum())
        key = jax.random.key(opts.seed)
        args = (model.params, state, logits, key, jnp.int32(n_new))
        static = dict(policy=policy, max_new_tokens=bucket, sampler=opts.sampler, stop_ids=req.stop_ids)
        del state  # donated to decode
        o, n, state = timed(decode, args, {**static, **common}, "decode")
        out[rows] = np.asarray(o)[:, :n_new]
        n_out[rows] = np.asarray(n)
        states.append(state)
    tok = model.tokenizer
    texts = []
    for r in range(n_rows):
        if opts.stop:
            text, n = cut_at_stop(tok, out[r, : n_out[r]].tolist(), opts.stop)
            out[r, n:] = cfg.pad_id
            n_out[r] = n
        else:
            text = tok.decode(out[r, : n_out[r]])
        texts.append(text)
    prompt_tokens = sum(len(x) for x in req.ids)
    generated = int(n_out.sum())
    stats = {
        "prompt_tokens": prompt_tokens,
        "prefill_tokens": prefilled,
        "prefill_tokens_saved": prompt_tokens - prefilled,
        "prefix_groups": [{"prefix_tokens": g.prefix_len, "rows": list(g.rows)} for g in order],
        "generated_tokens": generated,
        **times,
        "compile_s": times["prefill_compile_s"] + times["decode_compile_s"],
        "prefill_tokens_per_s": prefilled / max(times["prefill_s"], 1e-9),
        "decode_tokens_per_s": max(generated - n_rows, 0) / max(times["decode_s"], 1e-9),
        "kv_bytes": sum(s.nbytes for s in states),
        "dense_kv_bytes": sum(s.dense_nbytes(cfg) for s in states),
        "policy": opts.policy.spec(),
        "new_tokens_bucket": bucket,
    }
    return out, n_out, texts, states, stats


__all__ = ["Node", "PrefixGroup", "generate_shared", "plan_groups", "prefix_tree", "reused_tokens"]
