"""Lossless speculative decoding with compressed drafts: TriForce's hierarchy.

Sun et al., "TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical
Speculative Decoding" (2024), arXiv:2404.11912. Speculative sampling: Leviathan et al. (2023),
arXiv:2211.17192; Chen et al. (2023), arXiv:2302.01318.

Levels, top to bottom (`Level`; level 0 is the target):

    0  the target model over its full cache (the verifier policy: dense, or any policy that
       appends while decoding and rolls back, `Policy.truncate`)
    1  the same model over a TriForce retrieval cache (`policies.triforce_retrieval`: the sink
       chunk + the chunks of 8 keys the last prompt query favours, `budget` tokens)
    2  (optional) a StreamingLLM cache (`sink` first tokens + `window` recent ones) of the same
       model or of a smaller `draft_model` with the same vocabulary

Each outer round, level 1 proposes gamma tokens (sampled from its own distribution q, itself by
speculative decoding over level 2 when there is one: level 2 proposes `draft_gamma` tokens, level
1 verifies them in one forward, until level 1 has gamma + 1 tokens), and the target verifies them
in one forward of gamma + 1 tokens (the pending token + the drafts). Per row, draft i is
accepted with probability min(1, p_i(x_i) / q_i(x_i)) while all before it were; at the first
rejection a token is drawn from norm(max(p - q, 0)); when all are accepted a bonus token comes
from p_{gamma+1}. Greedy decoding is the one-hot case (accept while the argmaxes agree, then
the target's argmax). Every level's output is thus distributed exactly as its verifier's.

Rows accept different counts: every state keeps per-row lengths and write offsets, and after
each verification every level's state is rolled back (`Policy.truncate`) to the committed
tokens; the StreamingLLM level is then re-evicted to its sinks + window (`reevict`). Only
appends happen between two rollbacks, so a rollback leaves each state as if it had never seen
the rejected tokens.

    out, n_out, states, stats = speculative_decode(params, states, first_logits, key, limit,
                                                   plan=plan, sampler=..., stop_ids=...)
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from ..models.config import LlamaConfig
from ..models.forward import forward
from ..policies import rows, slots
from ..policies.base import Policy, PolicyError, check_positive
from ..policies.triforce_retrieval import TriForceRetrieval
from ..sampling import Sampler
from ..state import KVState, LayerContext, SlotKV, bound_length
from .resume import appends_in_chunks
from .steps import prefill

# ---- the accept / resample rule -------------------------------------------------------------


def accept(p: jax.Array, q: jax.Array, drafts: jax.Array, u: jax.Array, key: jax.Array, greedy: bool = False):
    """Speculative sampling's verification of one round, per row.

    p [B, g+1, V]: the verifier's distributions at the g drafted positions and the one after;
    q [B, g, V]: the drafter's distributions the drafts were drawn from; drafts [B, g] int;
    u [B, g] uniform in [0, 1). Draft i is accepted when u_i q_i(x_i) < p_i(x_i) (probability
    min(1, p/q)) and every earlier one was. Returns (n [B] accepted drafts, token [B] the next
    token, dist [B, V] the distribution it was drawn from: norm(max(p_n - q_n, 0)) after a
    rejection, p_g when all were accepted). greedy: take dist's argmax instead of sampling
    (with one-hot p and q that is the target's argmax)."""
    g = drafts.shape[1]
    pd = jnp.take_along_axis(p[:, :g], drafts[..., None], axis=2)[..., 0]
    qd = jnp.take_along_axis(q, drafts[..., None], axis=2)[..., 0]
    ok = u * qd < pd
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    dist = residual(p, q, n)
    if greedy:
        tok = jnp.argmax(dist, axis=-1)
    else:
        tok = jax.random.categorical(key, jnp.log(dist), axis=-1)
    return n.astype(jnp.int32), tok.astype(jnp.int32), dist


def residual(p: jax.Array, q: jax.Array, n: jax.Array) -> jax.Array:
    """The distribution the token after n accepted drafts comes from: norm(max(p_n - q_n, 0))
    for n < g, p_g for n = g (q_g = 0). p [B, g+1, V], q [B, g, V], n [B] -> [B, V]."""
    b = p.shape[0]
    qpad = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    pn, qn = p[jnp.arange(b), n], qpad[jnp.arange(b), n]
    res = jnp.maximum(pn - qn, 0.0)
    total = jnp.sum(res, axis=-1, keepdims=True)
    return jnp.where(total > 0, res / jnp.where(total > 0, total, 1.0), pn)


# ---- the streaming draft cache ---------------------------------------------------------------


def reevict_layer(layer: SlotKV, lengths: jax.Array, sink: int, window: int) -> SlotKV:
    """A slot cache cut back to the first `sink` positions and the last `window` ones before
    lengths [B] (StreamingLLM's kept set), kept slots first in position order, the same
    capacity; fill = sink + window."""
    keep = (layer.pos >= 0) & ((layer.pos < sink) | (layer.pos >= (lengths - window)[:, None, None]))
    score = jnp.where(keep, layer.pos.astype(jnp.float32), -jnp.inf)
    n_keep = jnp.sum(keep, axis=2)
    idx, valid = slots.select_indices(layer, score, n_keep, sink + window)
    return slots.gather(layer, idx, valid, layer.capacity - (sink + window))


@dataclasses.dataclass(frozen=True)
class StreamingDraft(Policy):
    """StreamingLLM's cache for a draft level (Xiao et al. 2023, arXiv:2309.17453): after the
    prompt, the first `sink` tokens and the last `window` ones, plus `headroom` slots the tokens
    of one speculative round are appended into. Decoding appends and never evicts (so a round
    rolls back exactly); `reevict` re-applies the sink + window rule once the round's tokens
    are committed. Not registered: the registered `streaming` policy evicts every step."""

    name = "streaming_draft"
    sink: int = 16
    window: int = 240
    headroom: int = 16

    def __post_init__(self):
        check_positive("sink", self.sink, 0)
        check_positive("window", self.window)
        check_positive("headroom", self.headroom)

    def prefill_capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        return prompt_len + max(self.headroom, 0)

    def after_prefill(self, state, q, q_pos, res, ctx: LayerContext):
        if not ctx.final or not isinstance(state, SlotKV):
            return state
        cap = self.sink + self.window + self.headroom
        if state.capacity < cap:
            state = slots.gather(
                state,
                jnp.broadcast_to(jnp.arange(state.capacity, dtype=jnp.int32), state.pos.shape),
                state.pos >= 0,
                cap - state.capacity,
            )
        lengths = slots.row_lengths(state.pos)
        out = reevict_layer(state, lengths, self.sink, self.window)
        return SlotKV(out.k[:, :, :cap], out.v[:, :, :cap], out.pos[:, :, :cap], out.fill)


def reevict(state: KVState, sink: int, window: int) -> KVState:
    """`reevict_layer` on every layer of a `StreamingDraft` state, per-row write offsets."""
    layers = tuple(reevict_layer(layer, state.lengths, sink, window) for layer in state.layers)
    return rows.per_row_fill(state.replace(layers=layers))


# ---- one prefill for several caches ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Tiered(Policy):
    """Several caches of one model filled by one prefill: each layer's state is a tuple, part i
    prefilled by policy i from the same q, k, v (the first part's attention output goes on; the
    others' is unused and compiled away). `split_tiers` gives one `KVState` per part."""

    name = "tiered"
    parts: tuple = ()

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        return tuple(p.init_layer(layer, batch, prompt_len, max_new_tokens, config, dtype) for p in self.parts)

    def validate(self, prompt_len, config):
        for p in self.parts:
            p.validate(prompt_len, config)

    def prefill(self, state, q, k, v, q_pos, ctx):
        done = [p.prefill(s, q, k, v, q_pos, ctx) for p, s in zip(self.parts, state)]
        return tuple(s for s, _ in done), done[0][1]

    def decode(self, state, q, k, v, q_pos, ctx):
        raise PolicyError("a tiered state is split (`split_tiers`) before decoding")


def split_tiers(state: KVState) -> tuple[KVState, ...]:
    """A `Tiered` state as one `KVState` per part (each with its own copy of `lengths`, so every
    part can be donated)."""
    n = len(state.layers[0])
    return tuple(
        KVState(layers=tuple(layer[i] for layer in state.layers), lengths=jnp.copy(state.lengths)) for i in range(n)
    )


# ---- the plan -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of the hierarchy (static, hashable). model: 0 = the target's parameters, 1 =
    the draft model's; policy: the cache policy its decode steps run (append-only); gamma: the
    tokens it drafts per round for the level above (unused for level 0); window > 0: a
    StreamingLLM cache re-evicted to `sink` + `window` after every outer round. prefill_policy:
    the policy that builds the level's cache from the prompt (None: `policy`); it is left out
    of the level's hash and equality, so caches built with other budgets decode with the same
    compiled loop (decode steps append, whatever the prompt-time selection was)."""

    model: int
    config: LlamaConfig
    policy: Policy
    dtype: object
    gamma: int = 0
    sink: int = 0
    window: int = 0
    prefill_policy: Policy | None = dataclasses.field(default=None, compare=False)

    @property
    def builder(self) -> Policy:
        return self.prefill_policy or self.policy


@dataclasses.dataclass(frozen=True)
class TriForce:
    """TriForce's settings. budget: retrieval-cache tokens (level 1); chunk: keys per chunk;
    gamma: tokens level 1 drafts per target verification; draft_gamma: tokens level 2 drafts
    per level-1 verification (0 = no level 2: the retrieval cache drafts autoregressively);
    sink / window: level 2's StreamingLLM cache.

    Spec string: ``triforce:budget=256,gamma=6,draft_gamma=4,sink=16,window=240``. The paper's
    retrieval budget is 4096 tokens at 128k (1/32 of the context); 256 is the same fraction
    of SmolLM2's 8k context."""

    budget: int = 256
    chunk: int = 8
    gamma: int = 6
    draft_gamma: int = 4
    sink: int = 16
    window: int = 240

    def __post_init__(self):
        for name in ("gamma", "chunk", "window"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"speculative {name}={v!r} must be an integer >= 1")
        for name in ("draft_gamma", "sink"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"speculative {name}={v!r} must be an integer >= 0 (draft_gamma 0 = one level)")
        TriForceRetrieval(budget=self.budget, chunk=self.chunk)  # checks budget and chunk

    @property
    def levels(self) -> int:
        """Draft levels below the target: 2 with a StreamingLLM level, else 1."""
        return 2 if self.draft_gamma else 1

    @property
    def slack(self) -> int:
        """Tokens a round may append beyond the committed ones (cache headroom)."""
        return self.gamma + self.draft_gamma + 2

    def spec(self) -> str:
        return "triforce:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))


def parse_speculative(spec) -> TriForce:
    """A `TriForce` from itself or a spec string ``triforce[:key=value,...]`` (keys: the
    fields of `TriForce`)."""
    if isinstance(spec, TriForce):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"speculative={spec!r} must be a spec string such as 'triforce:budget=256,gamma=6'")
    name, _, args = spec.strip().partition(":")
    if name.strip().lower() != "triforce":
        raise ValueError(f"speculative={spec!r}: unknown method {name!r}; expected 'triforce[:key=value,...]'")
    fields = {f.name for f in dataclasses.fields(TriForce)}
    kw = {}
    for item in filter(None, (s.strip() for s in args.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq or key not in fields:
            raise ValueError(f"speculative={spec!r}: {item!r} is not key=value with a key in {sorted(fields)}")
        if not re.fullmatch(r"\s*\d+\s*", val):
            raise ValueError(f"speculative={spec!r}: {key}={val.strip()!r} must be an integer")
        kw[key] = int(val)
    return TriForce(**kw)


def check_verifier(policy: Policy, gamma: int) -> None:
    """Raise PolicyError for a verifier policy that cannot roll back gamma tokens exactly (a
    policy that evicts while decoding; a quantized cache whose full-precision residual window is
    shorter than gamma)."""
    if policy.evicts_on_decode:
        raise PolicyError(
            f"speculative decoding rolls the verifier's cache back to the accepted tokens, but {policy.spec()!r} "
            "evicts tokens while decoding and cannot be rolled back; use dense, a quantized or a prompt-time "
            "eviction policy"
        )
    limit = getattr(policy, "rollback_limit", None)
    if callable(limit) and limit() < gamma:
        raise PolicyError(
            f"the verifier policy {policy.spec()!r} can roll back only {limit()} tokens exactly; gamma={gamma} "
            f"needs {gamma} (raise its residual window)"
        )


# ---- the jitted loop -----------------------------------------------------------------------


def _ctx(level: Level, t: int, implementation):
    return LayerContext(0, level.config, "decode", True, 0, t, implementation)


def _feed(params, level: Level, state, tokens, positions, implementation, last_only=False):
    """tokens, positions [B, T] into `state` (decode phase): one forward, or one per token in a
    `lax.scan` for a policy whose decode step takes one token at a time (quantized caches,
    `resume.appends_in_chunks`). Returns (float32 logits [B, T, V] or [B, V] when last_only,
    state)."""
    b, t = tokens.shape

    def fwd(st, tok, pos, at):
        return forward(
            params[level.model],
            tok,
            pos,
            st,
            config=level.config,
            policy=level.policy,
            ctx=_ctx(level, tok.shape[1], implementation),
            dtype=level.dtype,
            logits_at=at,
        )

    if t == 1 or appends_in_chunks(level.policy):
        return fwd(state, tokens, positions, jnp.full((b,), t - 1, jnp.int32) if last_only else None)

    def step(st, xs):
        logits, st = fwd(st, xs[0][:, None], xs[1][:, None], jnp.zeros((b,), jnp.int32))
        return st, logits

    state, logits = jax.lax.scan(step, state, (tokens.T, positions.T))
    logits = jnp.swapaxes(logits, 0, 1)
    return (logits[:, -1] if last_only else logits), state


def _truncate(levels, states, lengths, frm: int):
    """states[frm:] rolled back to lengths [B] (each level's own policy)."""
    return states[:frm] + tuple(
        rows.per_row_fill(levels[i].policy.truncate(states[i], lengths)) for i in range(frm, len(states))
    )


def _draft(i, params, levels, states, cur, pos, need, live, key, stats, sampler, implementation):
    """Level i proposes K >= need + 1 tokens after `cur` [B] (at positions pos [B]; every state
    from level i down has consumed exactly the positions before pos). Returns (tokens [B, W],
    their level-i distributions [B, W, V], K [B], states, key, stats), with level i and below
    having consumed cur and tokens[:, :K-1] (positions pos .. pos + K - 1). Rows not `live` are
    rolled back to where they started. stats [L, 2]: per verifying level, (accepted, proposed)."""
    b = cur.shape[0]
    vocab = levels[0].config.vocab_size
    lev = levels[i]
    if i == len(levels) - 1:  # the bottom level samples need + 1 tokens one by one
        w = need + 1

        def step(j, carry):
            st, tok, toks, probs, key = carry
            logits, st = _feed(params, lev, st, tok[:, None], (pos + j)[:, None], implementation, last_only=True)
            key, sub = jax.random.split(key)
            nxt, pr = sampler.sample_and_probs(logits, sub)
            return st, nxt, toks.at[:, j].set(nxt), probs.at[:, j].set(pr), key

        init = (states[i], cur, jnp.zeros((b, w), jnp.int32), jnp.zeros((b, w, vocab), jnp.float32), key)
        st, _, toks, probs, key = jax.lax.fori_loop(0, w, step, init)
        states = states[:i] + (st,)
        return toks, probs, jnp.full((b,), w, jnp.int32), states, key, stats

    g = levels[i + 1].gamma
    w = need + 1 + g
    col = jnp.arange(g + 1, dtype=jnp.int32)

    def cond(c):
        return jnp.any(live & (c[3] < need + 1))

    def body(c):
        states, cur, pc, k, toks, probs, key, stats = c
        active = live & (k < need + 1)
        dt, dq, _, states, key, stats = _draft(
            i + 1, params, levels, states, cur, pc, g, active, key, stats, sampler, implementation
        )
        dt, dq = dt[:, :g], dq[:, :g]
        logits, st = _feed(
            params, lev, states[i], jnp.concatenate([cur[:, None], dt], 1), pc[:, None] + col, implementation
        )
        states = states[:i] + (st,) + states[i + 1 :]
        p = sampler.probs(logits)
        key, ku, kr = jax.random.split(key, 3)
        n, nxt, _ = accept(p, dq, dt, jax.random.uniform(ku, dt.shape), kr, sampler.greedy)
        seq = jnp.where(col[None] < n[:, None], jnp.pad(dt, ((0, 0), (0, 1))), nxt[:, None])
        dest = jnp.where(active[:, None] & (col[None] <= n[:, None]), k[:, None] + col[None], w)  # w: dropped
        bi = jnp.arange(b)[:, None]
        toks = toks.at[bi, dest].set(seq, mode="drop")
        probs = probs.at[bi, dest].set(p, mode="drop")
        new = jnp.where(active, pc + 1 + n, pc)
        states = _truncate(levels, states, new, i)
        stats = stats.at[i].add(jnp.stack([jnp.sum(jnp.where(active, n, 0)), jnp.sum(active) * g]).astype(jnp.float32))
        return (states, jnp.where(active, nxt, cur), new, jnp.where(active, k + n + 1, k), toks, probs, key, stats)

    init = (
        states,
        cur,
        pos,
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, w), jnp.int32),
        jnp.zeros((b, w, vocab), jnp.float32),
        key,
        stats,
    )
    states, _, _, k, toks, probs, key, stats = jax.lax.while_loop(cond, body, init)
    return toks, probs, k, states, key, stats


_STATIC = ("levels", "max_new_tokens", "sampler", "stop_ids", "implementation")


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnames=("states",))
def speculative_decode(
    params: tuple,
    states: tuple,
    first_logits,
    key,
    limit,
    *,
    levels: tuple[Level, ...],
    max_new_tokens: int,
    sampler: Sampler,
    stop_ids: tuple[int, ...],
    implementation: str | None = None,
):
    """Sample up to `limit` tokens per row (<= max_new_tokens, static output width) with the
    hierarchy `levels` (module doc). params: (target parameters, draft model parameters or
    None); states: one `KVState` per level, each having consumed the prompt (donated);
    first_logits [B, V]: the target's logits after the prompt.

    Returns (tokens [B, max_new_tokens] int32 (pad_id after a row stops), n_out [B], states,
    stats): stats = {"rounds": target verifications, "row_rounds": verifications summed over
    the rows still decoding, "round_tokens": tokens those rounds committed, "accepted" [L-1],
    "proposed" [L-1]: drafts accepted / proposed at each verifying level (0 = the target)}."""
    tgt = levels[0]
    b = first_logits.shape[0]
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    limit = jnp.minimum(jnp.asarray(limit, jnp.int32), max_new_tokens)
    gamma = levels[1].gamma
    col = jnp.arange(gamma + 1, dtype=jnp.int32)
    states = tuple(rows.per_row_fill(s) for s in states)

    key, sub = jax.random.split(key)
    x = sampler(first_logits, sub)
    out = jnp.full((b, max_new_tokens), tgt.config.pad_id, jnp.int32).at[:, 0].set(x)
    done = jnp.isin(x, stops) | (limit <= 1)
    stats = jnp.zeros((len(levels) - 1, 2), jnp.float32)
    counters = jnp.zeros((3,), jnp.int32)  # rounds, row_rounds, round_tokens

    def cond(c):
        return jnp.any(~c[3])

    def body(c):
        states, x, out, done, n_out, key, stats, counters = c
        pos = states[0].lengths
        live = ~done
        dt, dq, _, states, key, stats = _draft(
            1, params, levels, states, x, pos, gamma, live, key, stats, sampler, implementation
        )
        dt, dq = dt[:, :gamma], dq[:, :gamma]
        logits, st = _feed(
            params, tgt, states[0], jnp.concatenate([x[:, None], dt], 1), pos[:, None] + col, implementation
        )
        p = sampler.probs(logits)
        key, ku, kr = jax.random.split(key, 3)
        n, nxt, _ = accept(p, dq, dt, jax.random.uniform(ku, dt.shape), kr, sampler.greedy)
        seq = jnp.where(col[None] < n[:, None], jnp.pad(dt, ((0, 0), (0, 1))), nxt[:, None])
        # commit up to the limit and through the first stop token
        count = jnp.minimum(n + 1, limit - n_out)
        is_stop = jnp.isin(seq, stops) & (col[None] < count[:, None])
        first_stop = jnp.min(jnp.where(is_stop, col[None], gamma + 1), axis=1)
        count = jnp.where(live, jnp.minimum(count, first_stop + 1), 0)
        dest = jnp.where(col[None] < count[:, None], n_out[:, None] + col[None], max_new_tokens)
        out = out.at[jnp.arange(b)[:, None], dest].set(seq, mode="drop")
        n_out = n_out + count
        new_done = done | (first_stop <= gamma) & live | (n_out >= limit)
        # committed: the pending x and seq[:count - 1] are fed, seq[count - 1] is pending (a row
        # that stops here keeps exactly its output minus the last token, as plain decoding does)
        new = jnp.where(live, pos + count, pos)
        states = (rows.per_row_fill(tgt.policy.truncate(st, new)),) + states[1:]
        states = _truncate(levels, states, new, 1)
        states = tuple(
            reevict(s, lev.sink, lev.window) if lev.window else s for s, lev in zip(states, levels, strict=True)
        )
        stats = stats.at[0].add(jnp.stack([jnp.sum(jnp.where(live, n, 0)), jnp.sum(live) * gamma]).astype(jnp.float32))
        counters = counters + jnp.stack([jnp.int32(1), jnp.sum(live), jnp.sum(count)]).astype(jnp.int32)
        return states, jnp.where(live, nxt, x), out, new_done, n_out, key, stats, counters

    init = (states, x, out, done, jnp.ones((b,), jnp.int32), key, stats, counters)
    states, _, out, _, n_out, _, stats, counters = jax.lax.while_loop(cond, body, init)
    info = {
        "rounds": counters[0],
        "row_rounds": counters[1],
        "round_tokens": counters[2],
        "accepted": stats[:, 0],
        "proposed": stats[:, 1],
    }
    return out, n_out, states, info


# ---- from a model and prompts -------------------------------------------------------------


def build_levels(model, plan: TriForce, verifier: Policy, draft_model=None) -> tuple[Level, ...]:
    """The static hierarchy for `model` (target) and an optional `draft_model` (level 2).
    Raises ValueError for a draft model whose vocabulary differs from the target's, or one
    given while the plan has no level 2 (draft_gamma=0)."""
    check_verifier(verifier, plan.gamma)
    cfg = model.config
    levels = [
        Level(0, cfg, verifier, model.dtype),
        Level(
            0,
            cfg,
            TriForceRetrieval(),  # decode steps append; the budget only shapes the prefill
            model.dtype,
            gamma=plan.gamma,
            prefill_policy=TriForceRetrieval(budget=plan.budget, chunk=plan.chunk),
        ),
    ]
    if plan.draft_gamma:
        dm = draft_model if draft_model is not None else model
        if dm.config.vocab_size != cfg.vocab_size:
            raise ValueError(
                f"draft_model's vocabulary ({dm.config.vocab_size} tokens) differs from the target's "
                f"({cfg.vocab_size}); speculative decoding compares their distributions token by token"
            )
        levels.append(
            Level(
                0 if draft_model is None else 1,
                dm.config,
                StreamingDraft(),  # decode steps append; `reevict` applies sink + window
                dm.dtype,
                gamma=plan.draft_gamma,
                sink=plan.sink,
                window=plan.window,
                prefill_policy=StreamingDraft(sink=plan.sink, window=plan.window, headroom=plan.slack),
            )
        )
    elif draft_model is not None:
        raise ValueError("draft_model is the StreamingLLM level; it needs draft_gamma >= 1 (draft_gamma=0 given)")
    return tuple(levels)


def prefill_levels(
    model, levels, tokens, lengths, width: int, longest: int, max_new_tokens: int, draft_model=None, *, times=None,
    implementation=None,
):  # fmt: skip
    """Prefill every level: the target's levels (its full cache, the retrieval cache and, with no
    draft model, the StreamingLLM cache) in one pass of the target (`Tiered`), a draft model's
    cache in a pass of its own. tokens [B, width] right-padded, lengths [B]; longest: a static
    bound on the lengths. times: a dict that gets "prefill_compile_s" and "prefill_s" added
    (each program compiled before it runs). Returns (target logits [B, V], states tuple)."""
    if tokens.shape[1] != width:
        raise ValueError(f"tokens of shape {tokens.shape} for a prompt width of {width}")

    def run(m, policy):
        args = (m.params, tokens, lengths)
        static = dict(
            config=m.config,
            policy=policy,
            max_new_tokens=max_new_tokens,
            dtype=m.dtype,
            longest=longest,
            implementation=implementation,
        )
        t0 = time.perf_counter()
        exe = prefill.lower(*args, **static).compile()
        t1 = time.perf_counter()
        out = jax.block_until_ready(exe(*args))
        if times is not None:
            times["prefill_compile_s"] = times.get("prefill_compile_s", 0.0) + t1 - t0
            times["prefill_s"] = times.get("prefill_s", 0.0) + time.perf_counter() - t1
        return out

    logits, state = run(model, Tiered(parts=tuple(lev.builder for lev in levels if lev.model == 0)))
    tiers = [rows.per_row_fill(t) for t in split_tiers(state)]  # the loop's carry layout, so donation applies
    states = []
    for lev in levels:
        if lev.model == 0:
            states.append(tiers.pop(0))
        else:
            states.append(rows.per_row_fill(run(draft_model, lev.builder)[1]))
    return logits, tuple(states)


def generate_speculative(model, call, speculative, draft_model=None, *, implementation=None):
    """`kvjax.generate(..., speculative=...)`: prefill every level, run `speculative_decode`,
    and return a `GenerateOutput` whose stats add `speculative` (the plan's spec),
    `acceptance_rate` per verifying level ([target, level 1] with a StreamingLLM level),
    `tokens_per_verify` (tokens committed per target forward, per row) and
    `target_forwards` (outer rounds). `call` is api's `_Call`."""
    plan = parse_speculative(speculative)
    opts = call.req.options
    if opts.prefill_chunk is not None:
        raise ValueError("speculative decoding prefills the prompt whole (the retrieval cache needs the last query)")
    if opts.stop:
        raise ValueError("speculative decoding stops on stop_ids only; stop strings are not supported with it")
    if draft_model is not None:
        from .request import check_model

        check_model(draft_model)
    levels = build_levels(model, plan, opts.policy, draft_model)
    bucket = opts.new_tokens_bucket
    longest = bound_length(max(len(t) for t in call.req.ids), call.req.width)
    call.times["prefill_s"] = call.times["prefill_compile_s"] = 0.0
    logits, states = prefill_levels(
        model,
        levels,
        call.tokens,
        call.lengths,
        call.req.width,
        longest,
        bucket + plan.slack,
        draft_model,
        times=call.times,
        implementation=implementation,
    )
    call.kv_after_prefill = states[0].nbytes
    params = (model.params, None if draft_model is None else draft_model.params)
    static = dict(
        levels=levels,
        max_new_tokens=bucket,
        sampler=opts.sampler,
        stop_ids=call.req.stop_ids,
        implementation=implementation,
    )
    args = (params, states, logits, jax.random.key(opts.seed), jnp.int32(opts.max_new_tokens))
    t0 = time.perf_counter()
    exe = speculative_decode.lower(*args, **static).compile()
    call.times["decode_compile_s"] = time.perf_counter() - t0
    del states
    t0 = time.perf_counter()
    out, n_out, states, info = jax.block_until_ready(exe(*args))
    call.times["decode_s"] = time.perf_counter() - t0
    out = np.asarray(out)[:, : opts.max_new_tokens]
    n_out = np.asarray(n_out)
    texts = [model.tokenizer.decode(out[i, : n_out[i]]) for i in range(len(n_out))]
    result = call.finish(out, n_out, states[0], texts)
    result.stats.update(speculative_stats(info, plan))
    return result


def speculative_stats(info: dict, plan: TriForce) -> dict:
    """The stats `generate_speculative` adds, from `speculative_decode`'s info."""
    acc, prop = np.asarray(info["accepted"]), np.asarray(info["proposed"])
    return {
        "speculative": plan.spec(),
        "acceptance_rate": [float(a / p) if p else float("nan") for a, p in zip(acc, prop)],
        "tokens_per_verify": float(info["round_tokens"]) / max(int(info["row_rounds"]), 1),
        "target_forwards": int(info["rounds"]),
    }


__all__ = [
    "Level",
    "StreamingDraft",
    "Tiered",
    "TriForce",
    "accept",
    "build_levels",
    "generate_speculative",
    "parse_speculative",
    "prefill_levels",
    "reevict",
    "residual",
    "speculative_decode",
    "speculative_stats",
]
