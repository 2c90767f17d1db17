"""The quantized-cache engine shared by every method in `kvjax.quant`.

A `QuantPolicy` prefills exactly on a full-precision `SlotKV` (as KIVI does), then
`ingest`s the prompt (or another policy's kept slots) into a `QuantState`:

    streams   quantized tokens, one `Stream` per precision class (ZipCache has two);
              every leaf of a stream's `data` is [B, N, tokens-ish, ...] with the token
              axis at 2, so blocks are written per (row, head) at `count`
    res_k/v   [B, N, W, H] full-precision residual window (newest tokens), res_pos
              [B, N, W] (-1 = empty), res_len [B, N]; W = R + 2T (room for the T appends
              between two deferred flushes), or fewer (`residual_window`) when the kept tokens
              plus the decode headroom cannot fill it
    aux       method extras (ZipCache channel scales, RotateKV's full-precision sinks)

Sizes come from the tokens a row can bring (`_ingest`): the slots handed over, and for a
prompt the batch's static bound on true lengths (`LayerContext.prompt_bound`), not the
padded bucket. A window smaller than R + T never fills, so no token is quantized that R + T
would have kept exact: the cache behaves the same, it only holds less.

Decode appends the new token to the residual window and attends over the dequantized
streams + residual (+ aux segments) merged through their log-sum-exps. A window holding at
least R + T tokens is flushed: its T oldest tokens are quantized as one block (a masked write,
static shapes, no conditional). `generate`'s decode loop runs the flush once every T steps on
every layer (`maintain`, `LayerContext.deferred`), so a step does no quantization work; any
other caller of `decode` (several tokens at once, the serving engine, the sharded wrappers)
flushes at the start of each token. Either way the last R tokens are always exact, and a
flushed block is the same T tokens: the deferred schedule only keeps up to T - 1 more tokens
exact for a while. Counts are per (row, head): evicted caches with different kept tokens per
head work unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from .. import attention
from ..models.rope import inverse_frequencies
from ..policies import slots
from ..policies.base import Policy, PolicyError
from ..state import LayerContext, SlotKV, leaves_nbytes, slot_bytes_used


@struct.dataclass
class Stream:
    """data: pytree of arrays [B, N, L, ...] (token axis 2); count [B, N]: tokens stored;
    tokens_per_block: tokens one flush writes (static); capacity: tokens the data holds per
    (row, head) (static; 0 = unknown, all counted as used)."""

    data: Any
    count: jax.Array
    tokens_per_block: int = struct.field(pytree_node=False, default=1)
    capacity: int = struct.field(pytree_node=False, default=0)

    def nbytes_used(self) -> int:
        """Bytes of the stored tokens: the data's bytes x count / capacity, plus the counts."""
        data = sum(x.nbytes for x in jax.tree_util.tree_leaves(self.data))
        if self.capacity:
            data = data * int(jnp.sum(self.count)) // (self.count.size * self.capacity)
        return int(data + self.count.nbytes)


@struct.dataclass
class QuantState:
    """A quantized layer cache (see module doc). `nbytes` of the enclosing KVState counts
    every leaf: codes, scales, positions, residual window and extras."""

    streams: tuple
    res_k: jax.Array
    res_v: jax.Array
    res_pos: jax.Array
    res_len: jax.Array
    aux: Any = None

    def nbytes_used(self) -> int:
        """Bytes that hold tokens: stored stream tokens, filled residual slots (K, V, position
        and the per-slot extras, aux entries named "res_*"), filled sink slots, plus counters
        and the other extras."""
        used = sum(s.nbytes_used() for s in self.streams)
        res_valid = self.res_pos >= 0
        per_slot, fixed = [self.res_k, self.res_v, self.res_pos], [self.res_len]
        aux = self.aux if isinstance(self.aux, dict) else {"": self.aux}
        for key, x in aux.items():  # "res_*" extras follow the residual window's slots
            if key not in ("sink_k", "sink_v", "sink_pos"):
                (per_slot if key.startswith("res_") else fixed).extend(jax.tree_util.tree_leaves(x))
        used += slot_bytes_used(res_valid, per_slot, fixed)
        if "sink_pos" in aux:
            used += slot_bytes_used(aux["sink_pos"] >= 0, [aux["sink_k"], aux["sink_v"], aux["sink_pos"]])
        return int(used)

    def nbytes_read_per_step(self) -> int:
        """Bytes one decode step reads: every leaf (each stream is dequantized or read by the
        fused kernel whole, codes and scales of its empty headroom included, plus the residual
        window, sinks and extras)."""
        return leaves_nbytes(self)


def rope_heads(x: jax.Array, pos: jax.Array, cfg, inverse: bool = False) -> jax.Array:
    """RoPE (rotate-half, as `kvjax.models.rope`) for heads-major x [B, N, S, H] at
    per-head positions pos [B, N, S]; inverse=True undoes it. float32."""
    inv = jnp.asarray(inverse_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    ang = jnp.maximum(pos, 0).astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    sin = -sin if inverse else sin
    xf = x.astype(jnp.float32)
    half = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
    return xf * cos + rot * sin


def take_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather along the token axis 2: x [B, N, S, ...], idx [B, N, K] -> [B, N, K, ...]."""
    idx = idx.reshape(idx.shape + (1,) * (x.ndim - 3))
    return jnp.take_along_axis(x, idx, axis=2)


def fit_tokens(x: jax.Array, length: int, fill=0) -> jax.Array:
    """Pad (with `fill`) or cut the token axis 2 to `length`."""
    s = x.shape[2]
    if s >= length:
        return x[:, :, :length]
    widths = [(0, 0)] * x.ndim
    widths[2] = (0, length - s)
    return jnp.pad(x, widths, constant_values=fill)


def write_block(stream: Stream, block: Any, mask: jax.Array) -> Stream:
    """Write one flushed block (leaves [B, N, Lb, ...]) at each (row, head)'s `count`
    where mask [B, N] is set; advance those counts by `tokens_per_block`."""
    slot = stream.count // stream.tokens_per_block

    def put(leaf, blk):
        lb = blk.shape[2]
        start = slot * lb

        def one(l, bl, st, m):
            zeros = (0,) * (l.ndim - 1)
            old = jax.lax.dynamic_slice(l, (st,) + zeros, bl.shape)
            return jax.lax.dynamic_update_slice(l, jnp.where(m, bl.astype(l.dtype), old), (st,) + zeros)

        return jax.vmap(jax.vmap(one))(leaf, blk, start, mask)

    data = jax.tree_util.tree_map(put, stream.data, block)
    return stream.replace(data=data, count=stream.count + mask.astype(jnp.int32) * stream.tokens_per_block)


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class QuantPolicy(Policy):
    """Base of the quantized caches. Subclasses define `residual` (R, a field), `block`
    (T) and `codec(ctx)` (an object with encode(k, v, pos, aux) -> data and
    decode(data, aux) -> (k, v, pos | None), all [B, N, S, ...]); multi-stream methods
    override `encode_prompt` / `encode_block`."""

    stores_slots: ClassVar[bool] = True
    #: keys stored pre-RoPE carry their positions; post-RoPE codecs need none.
    needs_positions: ClassVar[bool] = False

    # ---- configuration ----------------------------------------------------------------
    def block(self, ctx: LayerContext) -> int:
        return 1

    def codec(self, ctx: LayerContext):
        raise NotImplementedError

    def prefill_capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        return prompt_len

    def validate(self, prompt_len: int, config) -> None:
        self.check_config(config)

    def check_config(self, config) -> None:
        """Raise PolicyError for a model this method cannot serve (override and call super)."""
        if config.sliding_window is not None and not self.needs_positions:
            raise PolicyError(
                f"{self.name}: sliding_window={config.sliding_window} needs key positions, which this "
                "quantized cache does not store"
            )

    # ---- prefill / ingest ---------------------------------------------------------------
    def wants_mass(self, ctx: LayerContext) -> bool:
        return False

    def prompt_scores(self, state: SlotKV, q, q_pos, res, ctx: LayerContext):
        """Per-slot importance [B, N, S] the method uses at ingest (None: not needed)."""
        return None

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        """Exact attention over the full-precision prompt (KIVI's prefill); quantize at
        the end of the prompt."""
        state = slots.append(state, k, v, q_pos)
        res = attention.attend(
            q,
            state.k,
            state.v,
            q_pos,
            state.pos,
            window=ctx.config.sliding_window,
            want_mass=ctx.final and self.wants_mass(ctx),
            implementation=ctx.implementation,
            prefix_cache=ctx.prefix_cache,
        )
        if ctx.final:
            state = self._ingest(state, ctx, self.prompt_scores(state, q, q_pos, res, ctx), own=True)
        return state, res.out

    def ingest(self, slots_state: SlotKV, ctx: LayerContext) -> QuantState:
        """Quantize the kept tokens of `slots_state` [B, N, C, H] (pos -1 = empty; per-head
        positions may differ) into a QuantState with room for ctx.max_new_tokens more."""
        return self._ingest(slots_state, ctx, None, own=False)

    def capacity(self, c_in: int, ctx: LayerContext) -> int:
        """Static quantized-token capacity for rows of at most `c_in` kept tokens: those plus
        the decode headroom, less the residual window, in whole blocks (at least one)."""
        t = self.block(ctx)
        return round_up(max(c_in + ctx.max_new_tokens - self.residual, t), t)

    def residual_window(self, c_in: int, ctx: LayerContext) -> int:
        """Static residual-window slots W for rows of at most `c_in` kept tokens: R + 2T, or,
        when those tokens plus the decode headroom fit in fewer, just enough for all of them,
        rounded up to whole blocks of T (a flush reads the window's first T slots).

        A flush leaves at most R + T tokens (it runs when the window holds R + T or more and
        takes T), so R + 2T holds the T tokens that `maintenance_period` decode steps append
        before the next flush. A window that holds every token never overflows."""
        t = self.block(ctx)
        return min(self.residual + 2 * t, round_up(c_in + ctx.max_new_tokens, t))

    def maintenance_period(self, ctx: LayerContext) -> int:
        """T: the decode loop flushes every layer once every T steps (`maintain`)."""
        return self.block(ctx)

    def maintain(self, state, ctx: LayerContext):
        """The deferred flush: quantize the T oldest tokens of every full window."""
        return self._flush(state, ctx) if isinstance(state, QuantState) else state

    def init_aux(self, k, v, pos, scores, ctx: LayerContext) -> Any:
        """Method extras computed from all kept tokens at ingest (default: none)."""
        return None

    def residual_aux(self, aux, res_scores, res_valid, ctx):
        """Extras attached to the residual window at ingest (default: unchanged)."""
        return aux

    def sink_count(self) -> int:
        """Tokens kept in full precision as attention sinks (needs a codec storing positions)."""
        return 0

    def sink_rank(self, pos, scores):
        """Ranking [B, N, S] of sink candidates (default: the earliest tokens)."""
        return -pos.astype(jnp.float32)

    def encode_prompt(self, k, v, pos, count, scores, aux, ctx: LayerContext, cap: int) -> tuple:
        """Quantize the first `count` [B, N] of k, v [B, N, cap, H] -> (tuple of Streams, aux).
        The `sink_count()` best-ranked tokens go to a full-precision sink buffer in aux
        (their stream slots are masked with position -1)."""
        n = min(self.sink_count(), cap)
        if n:
            live = jnp.arange(cap) < count[..., None]
            _, idx = jax.lax.top_k(jnp.where(live, self.sink_rank(pos, scores), -jnp.inf), n)
            ok = take_tokens(live, idx)
            hot = jnp.any((jnp.arange(cap) == idx[..., None]) & ok[..., None], axis=-2)
            aux = {
                **(aux or {}),
                "sink_k": take_tokens(k, idx),
                "sink_v": take_tokens(v, idx),
                "sink_pos": jnp.where(ok, take_tokens(pos, idx), -1),
            }
            pos = jnp.where(hot, -1, pos)
        data = self.codec(ctx).encode(k, v, pos, aux)
        return (Stream(data, count, self.block(ctx), cap),), aux

    def _ingest(self, st: SlotKV, ctx: LayerContext, scores, own: bool) -> QuantState:
        self.check_config(ctx.config)
        t, r = self.block(ctx), self.residual
        rc = r + t
        order = jnp.argsort((st.pos < 0).astype(jnp.int32), axis=2, stable=True)  # kept slots first
        k, v, pos = take_tokens(st.k, order), take_tokens(st.v, order), take_tokens(st.pos, order)
        scores = None if scores is None else take_tokens(scores, order)
        c_in = k.shape[2]
        # Tokens a row can bring: the slots handed over, at most the bound on true prompt
        # lengths (a prompt's slots beyond it hold padding).
        kept = min(c_in, ctx.prompt_bound) if ctx.prompt_bound else c_in
        w = self.residual_window(kept, ctx)
        count = jnp.sum(pos >= 0, axis=2).astype(jnp.int32)
        nq = jnp.where(count >= rc, (count - r) // t * t, 0)
        cap = self.capacity(kept, ctx)
        aux = self.init_aux(k, v, pos, scores, ctx)
        qpos = jnp.where(jnp.arange(cap) < nq[..., None], fit_tokens(pos, cap, -1), -1)
        streams, aux = self.encode_prompt(
            fit_tokens(k, cap),
            fit_tokens(v, cap),
            qpos,
            nq,
            None if scores is None else fit_tokens(scores, cap),
            aux,
            ctx,
            cap,
        )
        ridx = nq[..., None] + jnp.arange(w)
        valid = jnp.arange(w) < (count - nq)[..., None]
        ridx = jnp.clip(ridx, 0, c_in - 1)
        res_k = jnp.where(valid[..., None], take_tokens(k, ridx), 0).astype(st.k.dtype)
        res_v = jnp.where(valid[..., None], take_tokens(v, ridx), 0).astype(st.v.dtype)
        res_pos = jnp.where(valid, take_tokens(pos, ridx), -1)
        res_scores = None if scores is None else jnp.where(valid, take_tokens(scores, ridx), 0.0)
        aux = self.residual_aux(aux, res_scores, valid, ctx)
        return QuantState(streams, res_k, res_v, res_pos, count - nq, aux)

    # ---- decode -------------------------------------------------------------------------
    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        """Per new token: flush a full residual window (quantize its T oldest tokens; skipped for
        a single token when `ctx.deferred` is set: the decode loop calls `maintain`), append the
        token to the window, attend.

        The flush runs first and unconditionally: it writes only where a window is full (a masked
        block write, O(T) per (row, head)), and writing the stream *before* attention reads it lets
        XLA update the stream in place; a write after the read (or a `lax.cond` around it, which
        also costs GPUs a device-to-host sync per layer and step) makes it copy every stream leaf
        each step. Attention sees the same tokens either way: a window filled by this step's token
        is flushed at the start of the next step."""
        if not isinstance(state, QuantState):
            raise PolicyError(f"{self.name}: decode needs the quantized state a final prefill chunk produces")
        outs = []
        for i in range(q.shape[1]):
            if not ctx.deferred or q.shape[1] > 1:
                state = self._flush(state, ctx)
            state = self._append(state, k[:, i], v[:, i], q_pos[:, i])
            state, out = self._attend(state, q[:, i : i + 1], q_pos[:, i : i + 1], ctx)
            outs.append(out)
        return state, jnp.concatenate(outs, axis=1)

    def _append(self, state: QuantState, k, v, pos) -> QuantState:
        """k, v [B, N, H], pos [B] -> written at res_len of every head of valid rows."""
        rc = state.res_k.shape[2]
        ok = (pos >= 0)[:, None]
        hot = (jnp.arange(rc) == state.res_len[..., None]) & ok[..., None]
        return state.replace(
            res_k=jnp.where(hot[..., None], k[:, :, None].astype(state.res_k.dtype), state.res_k),
            res_v=jnp.where(hot[..., None], v[:, :, None].astype(state.res_v.dtype), state.res_v),
            res_pos=jnp.where(hot, pos[:, None, None], state.res_pos),
            res_len=state.res_len + ok.astype(jnp.int32),
        )

    def encode_block(self, k, v, pos, scores, aux, ctx: LayerContext) -> tuple:
        """Quantize one block of T tokens (k, v [B, N, T, H]) -> one data pytree per stream."""
        return (self.codec(ctx).encode(k, v, pos, aux),)

    def block_scores(self, state: QuantState, t: int):
        return None

    def shift_aux(self, aux, full, t: int):
        """Extras that follow the residual window when it drops its T oldest tokens."""
        return aux

    def _flush(self, state: QuantState, ctx: LayerContext) -> QuantState:
        t = self.block(ctx)
        full = state.res_len >= self.residual + t
        blocks = self.encode_block(
            state.res_k[:, :, :t],
            state.res_v[:, :, :t],
            state.res_pos[:, :, :t],
            self.block_scores(state, t),
            state.aux,
            ctx,
        )
        streams = tuple(write_block(s, b, full) for s, b in zip(state.streams, blocks))

        def shift(x, fill):
            moved = jnp.concatenate([x[:, :, t:], jnp.full_like(x[:, :, :t], fill)], axis=2)
            return jnp.where(full.reshape(full.shape + (1,) * (x.ndim - 2)), moved, x)

        return state.replace(
            streams=streams,
            res_k=shift(state.res_k, 0),
            res_v=shift(state.res_v, 0),
            res_pos=shift(state.res_pos, -1),
            res_len=state.res_len - full.astype(jnp.int32) * t,
            aux=self.shift_aux(state.aux, full, t),
        )

    # ---- rollback -----------------------------------------------------------------------
    def rollback_limit(self) -> int:
        """Newest tokens a decode state can always drop without reaching quantized ones: R.
        After ingest the residual window holds at least the newest min(count, R) tokens and
        after a decode step the newest R + 1 (`truncate_layer` says when the result is also
        identical to a state that never saw them)."""
        return self.residual

    def truncate_layer(self, layer, lengths):
        """Roll a QuantState back to per-row lengths [B]: residual slots at positions >=
        lengths[b] emptied (K, V and "res_*" extras zeroed, position -1), res_len reduced;
        full-precision sinks likewise. Quantized streams keep no positions and cannot give a
        token back, so every dropped token must still be in the residual window: with concrete
        arrays a rollback that reaches quantized tokens raises PolicyError (under `jit` it is
        the caller's guarantee; at most `rollback_limit()` tokens always qualify).

        The result is identical to the state that never saw the dropped tokens when no flush
        ran while they were appended, i.e. no window reached R + T tokens while they came (a
        flush runs once it has; with `generate`'s deferred flush, at the next maintenance). Otherwise that flush quantized the window's T
        oldest tokens earlier than the shorter state would have (at its next full window), so
        the two differ in which of those T tokens are exact for up to T decode steps. Methods
        that fold decode-time attention into their stored statistics (`tracks_residual_mass`)
        refuse: the dropped tokens' queries cannot be taken back."""
        if not isinstance(layer, QuantState):
            return super().truncate_layer(layer, lengths)
        if self.tracks_residual_mass:
            raise PolicyError(
                f"{self.name}: its residual statistics accumulate every decode query's attention, so a "
                "rollback cannot remove the dropped tokens' share; it cannot be truncated"
            )
        lengths = jnp.asarray(lengths, jnp.int32)
        drop = layer.res_pos >= lengths[:, None, None]
        self._check_rollback(layer, lengths)

        def clear(key, x):
            if key.startswith("res_") and x.ndim >= 3 and x.shape[:3] == drop.shape:
                m = drop.reshape(drop.shape + (1,) * (x.ndim - 3))
                return jnp.where(m, jnp.zeros((), x.dtype), x)
            return x

        aux = layer.aux
        if isinstance(aux, dict):
            aux = {key: clear(key, x) for key, x in aux.items()}
            if "sink_pos" in aux:
                sdrop = aux["sink_pos"] >= lengths[:, None, None]
                aux["sink_pos"] = jnp.where(sdrop, -1, aux["sink_pos"])
                for key in ("sink_k", "sink_v"):
                    aux[key] = jnp.where(sdrop[..., None], jnp.zeros((), aux[key].dtype), aux[key])
        return layer.replace(
            res_k=jnp.where(drop[..., None], jnp.zeros((), layer.res_k.dtype), layer.res_k),
            res_v=jnp.where(drop[..., None], jnp.zeros((), layer.res_v.dtype), layer.res_v),
            res_pos=jnp.where(drop, -1, layer.res_pos),
            res_len=layer.res_len - jnp.sum(drop, axis=2).astype(jnp.int32),
            aux=aux,
        )

    def _check_rollback(self, layer: QuantState, lengths) -> None:
        """With concrete arrays: PolicyError unless, in every (row, head) whose streams hold
        tokens, the oldest residual token sits at a position <= lengths[b] (then every quantized
        token is older than the cut, as the window holds the newest tokens in order)."""
        if any(isinstance(x, jax.core.Tracer) for x in (layer.res_pos, lengths)):
            return
        pos = np.asarray(layer.res_pos)
        n_len = np.asarray(lengths)[:, None]
        stored = sum(np.asarray(st.count) for st in layer.streams)
        oldest = np.where(pos >= 0, pos, np.iinfo(np.int32).max).min(axis=2)
        bad = (stored > 0) & (oldest > n_len)  # rows kept whole arrive with lengths = int32 max
        if bad.any():
            b, n = np.argwhere(bad)[0]
            raise PolicyError(
                f"{self.name}: rolling row {b} back to length {int(n_len[b, 0])} reaches tokens already "
                f"quantized (head {n}'s residual window starts at position {int(oldest[b, n])}); a "
                f"rollback is exact for at most rollback_limit()={self.rollback_limit()} tokens"
            )

    # ---- attention ----------------------------------------------------------------------
    def segments(self, state: QuantState, ctx: LayerContext) -> list:
        """(k, v, k_pos) triples [B, N, S, H] / [B, N, S] to attend over besides the residual
        window: the dequantized streams (and method extras)."""
        out = []
        for stream, codec in zip(state.streams, self.stream_codecs(ctx)):
            k, v, pos = codec.decode(stream.data, state.aux)
            valid = jnp.arange(k.shape[2]) < stream.count[..., None]
            kpos = jnp.zeros(valid.shape, jnp.int32) if pos is None else pos
            out.append((k, v, jnp.where(valid & (kpos >= 0), kpos, -1)))
        if isinstance(state.aux, dict) and "sink_k" in state.aux:
            out.append((state.aux["sink_k"], state.aux["sink_v"], state.aux["sink_pos"]))
        return out

    def stream_codecs(self, ctx: LayerContext) -> tuple:
        return (self.codec(ctx),)

    def residual_mass(self, state: QuantState, mass, ctx: LayerContext) -> QuantState:
        """Hook: softmax mass [B, N, W] the new query gave the residual window."""
        return state

    tracks_residual_mass: ClassVar[bool] = False

    def fused_attention(self, state: QuantState, q, q_pos, ctx: LayerContext):
        """A registered fused kernel's output, or None to use the jnp reference."""
        return None

    def _attend(self, state: QuantState, q, q_pos, ctx: LayerContext):
        fused = self.fused_attention(state, q, q_pos, ctx)
        if fused is not None and not self.tracks_residual_mass:
            return state, fused
        if attention.resolve_implementation(ctx.implementation, strict=False) == "pallas":
            why = "it tracks the residual window's mass" if fused is not None else "no fused kernel takes this state"
            attention.record_fallback(
                f"{self.name} (T={q.shape[1]}): {why}; the streams are dequantized, then attended"
            )
        return self.attend_reference(state, q, q_pos, ctx)

    def attend_reference(self, state: QuantState, q, q_pos, ctx: LayerContext):
        """Attention over dequantized streams + residual window (jnp reference)."""
        win = ctx.config.sliding_window
        outs, lses = [], []
        for k, v, kpos in self.segments(state, ctx):
            r = attention.attend(
                q, k.astype(q.dtype), v.astype(q.dtype), q_pos, kpos, window=win, implementation=ctx.implementation
            )
            outs.append(r.out)
            lses.append(r.lse)
        r = attention.attend(
            q,
            state.res_k.astype(q.dtype),
            state.res_v.astype(q.dtype),
            q_pos,
            state.res_pos,
            window=win,
            want_mass=self.tracks_residual_mass,
            implementation=ctx.implementation,
        )
        outs.append(r.out)
        lses.append(r.lse)
        if self.tracks_residual_mass:
            state = self.residual_mass(state, r.key_mass, ctx)
        out, _ = attention.merge_partials(outs, lses)
        return state, out


def dequantize_state(policy: QuantPolicy, state: QuantState, ctx: LayerContext):
    """All tokens a QuantState holds, dequantized: (k, v [B, N, S, H] float32, pos [B, N, S])
    with -1 for empty slots (quantized streams' positions are 0 unless stored)."""
    segs = policy.segments(state, ctx) + [
        (state.res_k.astype(jnp.float32), state.res_v.astype(jnp.float32), state.res_pos)
    ]
    return tuple(jnp.concatenate([s[i].astype(jnp.float32) if i < 2 else s[i] for s in segs], axis=2) for i in range(3))


def check_group(name: str, group: int, head_dim: int, what: str) -> None:
    """Raise PolicyError unless `group` divides `head_dim`."""
    if group <= 0 or head_dim % group:
        raise PolicyError(f"{name}: group={group} must divide head_dim={head_dim} ({what})")


def np_const(x) -> jax.Array:
    return jnp.asarray(np.asarray(x))
