"""Locret: eviction by trained retaining heads, with chunked prefill in a fixed-size cache.

Huang et al., "Locret: Enhancing Eviction in Long-Context LLM Inference with Trained
Retaining Heads" (2024), arXiv:2410.01805 (code: github.com/huangyuxiang03/Locret).

Retaining heads: per layer a small MLP R(x) = W2 silu(W1 x) (no biases) on the
concatenated pre-RoPE [q, k, v] of a token ([Nq*H + 2*N*H] inputs) predicts one causal
importance score (CIS) per KV head. The heads are trained on the frozen model with optax
(`kvjax.policies.locret_train`, run by `benchmarks/train_locret.py`); the SmolLM2 heads ship
in `kvjax/policies/data/locret/` (how they were trained: `benchmarks/train_locret.py` and
docs/methods.md, "locret"). Each token is scored once, when its chunk is prefilled.

Inference (the authors' `infer.py`): the prompt is prefilled chunk by chunk; after every
chunk the cache is cut back to its budget by the stored scores, the `stabilizers` most
recent tokens kept regardless; after the final chunk each row keeps floor(budget * length)
slots with its last `stabilizers` prompt tokens (the authors' uncompressed tail, local_len)
always among them. Decoding appends. The cache holds budget + chunk slots while prefilling
(`chunk`: the prefill chunk size, `generate(..., prefill_chunk=C)` with `locret:chunk=C`;
0 = room for the whole prompt, which also serves `prefill` without chunks: the whole prompt
is one chunk, scored and evicted once). The kept state is a `SlotKV` of budget slots plus
decode headroom, so Locret composes with quantizers (`locret:budget=0.1+kivi:bits=2`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ..models.rope import invert_rope
from ..state import LayerContext, SlotKV
from . import slots
from .base import Policy, PolicyError, budget_capacity, check_budget, check_positive
from .eviction import ScoredKV
from .registry import register

DATA_DIR = os.path.join(os.path.dirname(__file__), "data", "locret")
META_KEYS = ("model", "num_layers", "num_heads", "num_kv_heads", "head_dim")
_BIG = 2.0**23  # protected slots: above any head score; BIG + position stays exact in float32


class HeadsError(PolicyError):
    """Retaining-head checkpoint missing, unreadable, or trained for another model."""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_path(config) -> str:
    """Where the shipped heads for `config`'s model live."""
    return os.path.join(DATA_DIR, slug(config.name))


def heads_meta(config) -> dict:
    """The model facts a checkpoint must match."""
    return {
        "method": "locret",
        "model": config.name,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
    }


@functools.lru_cache(maxsize=16)
def _restore(path: str):
    import orbax.checkpoint as ocp

    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        meta = ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        arrays = ckpt.restore(path, args=ocp.args.Composite(heads=ocp.args.StandardRestore()))["heads"]
    except Exception as e:  # orbax raises several types for a missing or foreign directory
        raise HeadsError(f"cannot read a Locret retaining-head checkpoint at {path}: {type(e).__name__}: {e}") from e
    return meta, {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def load_heads(config, path: str = "") -> dict:
    """Retaining-head weights {w1 [L, F, D], w2 [L, D, N]} (float32 numpy) for `config`'s
    model from `path` (default: the shipped checkpoint). Cached per process. Raises
    HeadsError when missing, unreadable or trained for another model (name, layers, heads,
    head_dim and array shapes are checked)."""
    path = os.path.abspath(os.path.expanduser(path)) if path else default_path(config)
    hint = (
        "train heads with `python benchmarks/train_locret.py --out DIR` (or "
        "kvjax.policies.locret_train.train_and_save) and pass locret:calibration=DIR"
    )
    if not os.path.isdir(path):
        raise HeadsError(f"no Locret retaining heads for model {config.name!r} at {path}; {hint}")
    meta, heads = _restore(path)
    want = heads_meta(config)
    if meta.get("method") != "locret":
        raise HeadsError(f"checkpoint at {path} is for method {meta.get('method')!r}, not 'locret'; {hint}")
    if any(meta.get(k) != want[k] for k in META_KEYS):
        got = ", ".join(f"{k}={meta.get(k)!r}" for k in META_KEYS)
        exp = ", ".join(f"{k}={want[k]!r}" for k in META_KEYS)
        raise HeadsError(
            f"retaining heads at {path} were trained for another model ({got}); this model has {exp}; {hint}"
        )
    f_in = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    w1, w2 = heads.get("w1"), heads.get("w2")
    if (
        w1 is None
        or w2 is None
        or w1.ndim != 3
        or w2.ndim != 3
        or w1.shape[:2] != (config.num_layers, f_in)
        or w2.shape != (config.num_layers, w1.shape[2], config.num_kv_heads)
    ):
        shapes = {k: tuple(a.shape) for k, a in heads.items()}
        raise HeadsError(
            f"retaining heads at {path} have shapes {shapes}; expected w1 [{config.num_layers}, {f_in}, D] "
            f"and w2 [{config.num_layers}, D, {config.num_kv_heads}]"
        )
    return heads


def head_inputs(q, k, v, q_pos, config) -> jax.Array:
    """Retaining-head inputs [B, T, (Nq + 2N) * H] float32: pre-RoPE q, k and v of each
    token (q [B, T, Nq, H], k/v [B, T, N, H], q/k post-RoPE at positions q_pos [B, T])."""
    b, t = q_pos.shape
    pos = jnp.maximum(q_pos, 0)
    qp = invert_rope(q.astype(jnp.float32), pos, config).reshape(b, t, -1)
    kp = invert_rope(k.astype(jnp.float32), pos, config).reshape(b, t, -1)
    return jnp.concatenate([qp, kp, v.astype(jnp.float32).reshape(b, t, -1)], axis=-1)


def head_scores(w1, w2, x) -> jax.Array:
    """One layer's retaining head: x [..., F] -> CIS predictions [..., N] (W2 silu(W1 x))."""
    return jax.nn.silu(x @ w1) @ w2


@register
@dataclasses.dataclass(frozen=True)
class Locret(Policy):
    """budget: fraction of the prompt kept; chunk: prefill chunk size the cache makes room
    for (0 = the whole prompt); stabilizers: most recent tokens kept at every eviction;
    calibration: retaining-head checkpoint directory ("" = the shipped one)."""

    name = "locret"
    budget: float = 0.2
    chunk: int = 0
    stabilizers: int = 100
    calibration: str = ""

    def __post_init__(self):
        check_budget(self.budget)
        check_positive("chunk", self.chunk, 0)
        check_positive("stabilizers", self.stabilizers, 0)

    def validate(self, prompt_len, config):
        load_heads(config, self.calibration)

    def kept_slots(self, prompt_len: int) -> int:
        """Static kept-slot count per KV head (the budget of the longest row)."""
        return budget_capacity(self.budget, prompt_len)

    def prefill_capacity(self, prompt_len, max_new_tokens):
        if not self.chunk:
            return prompt_len
        return min(prompt_len, self.kept_slots(prompt_len) + self.chunk)

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        kv = SlotKV.empty(
            batch, config.num_kv_heads, self.prefill_capacity(prompt_len, max_new_tokens), config.head_dim, dtype
        )
        return ScoredKV(kv, jnp.zeros(kv.pos.shape, jnp.float32), jnp.zeros(kv.pos.shape[:2], jnp.int32))

    def scores(self, q, k, v, q_pos, ctx: LayerContext) -> jax.Array:
        """Retaining-head scores [B, N, T] of a chunk's tokens at layer ctx.layer."""
        heads = load_heads(ctx.config, self.calibration)
        w1, w2 = jnp.asarray(heads["w1"][ctx.layer]), jnp.asarray(heads["w2"][ctx.layer])
        return jnp.swapaxes(head_scores(w1, w2, head_inputs(q, k, v, q_pos, ctx.config)), 1, 2)

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        """Score and append a chunk, attend, then evict back to the budget (see module doc)."""
        t = k.shape[1]
        cap, kept = state.kv.capacity, min(self.kept_slots(ctx.prompt_len), state.kv.capacity)
        final_kept = min(self.kept_slots(ctx.prompt_bound), kept)  # the batch's bound on true lengths
        if not ctx.final and kept + t > cap:
            raise PolicyError(
                f"locret: a prefill chunk of {t} tokens does not fit next to the {kept} kept slots in a "
                f"cache of {cap}; set locret:chunk={t} (the prefill chunk size)"
            )
        if t > cap:
            raise PolicyError(
                f"locret: a prompt chunk of {t} tokens exceeds the cache of {cap} slots "
                f"(locret:chunk={self.chunk}); prefill in chunks of {self.chunk} or set chunk=0"
            )
        z = jnp.zeros((), jnp.int32)
        start = jnp.minimum(state.kv.fill, cap - t)  # where slots.append writes
        score = jax.lax.dynamic_update_slice(state.score, self.scores(q, k, v, q_pos, ctx), (z, z, start))
        kv = slots.append(state.kv, k, v, q_pos)
        res = self.attend(kv, q, q_pos, ctx)
        lengths = slots.row_lengths(kv.pos)
        recent = (kv.pos >= 0) & (kv.pos >= (lengths - self.stabilizers)[:, None, None])
        ranked = jnp.where(recent, _BIG + kv.pos, score)  # stabilizers first, newest first
        if not ctx.final:
            keep = jnp.full(lengths.shape, kept, jnp.int32)
            idx, valid = slots.select_indices(kv, ranked, keep, kept)
            new = slots.gather(kv, idx, valid, cap - kept)
            kept_score = jnp.pad(jnp.take_along_axis(score, idx, axis=2), ((0, 0), (0, 0), (0, cap - kept)))
            return ScoredKV(new, kept_score, state.limit), res.out
        idx, valid = slots.select_indices(kv, ranked, slots.keep_counts(lengths, self.budget), final_kept)
        return slots.gather(kv, idx, valid, ctx.max_new_tokens, align=True), res.out

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        if not isinstance(state, SlotKV):
            raise PolicyError("locret decodes on the SlotKV its final prefill chunk produces")
        return super().decode(state, q, k, v, q_pos, ctx)
