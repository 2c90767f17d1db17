"""The policy contract: one state type and pure prefill / decode / compress functions.

A policy is a frozen dataclass (hashable, so it is a static `jit` argument). The model
calls, for every layer,

    state, out = policy.prefill(state, q, k, v, q_pos, ctx)   # a prompt chunk [B, T]
    state, out = policy.decode(state, q, k, v, q_pos, ctx)    # new token(s)

with q [B, T, Nq, H], k/v [B, T, N, H] (post-RoPE), q_pos [B, T] (-1 = padding) and a
static `LayerContext`. `init_layer` gives the state a prompt enters with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from .. import attention
from ..state import KVState, LayerContext, SlotKV
from . import rows, slots


class PolicyError(ValueError):
    """A policy was configured or used with values it cannot honour."""


@dataclasses.dataclass(frozen=True)
class Policy:
    """Base class. Subclasses set `name` and override what they change."""

    name: ClassVar[str] = ""

    # ---- state ----------------------------------------------------------------------
    def prefill_capacity(self, prompt_len: int, max_new_tokens: int) -> int:
        """Slots the state needs while the prompt is being prefilled."""
        return prompt_len + max_new_tokens

    def init_layer(self, layer: int, batch: int, prompt_len: int, max_new_tokens: int, config, dtype) -> Any:
        return SlotKV.empty(
            batch, config.num_kv_heads, self.prefill_capacity(prompt_len, max_new_tokens), config.head_dim, dtype
        )

    def init_state(self, config, batch: int, prompt_len: int, max_new_tokens: int, dtype=jnp.bfloat16) -> KVState:
        """Empty whole-model state for `batch` prompts of (bucketed) length `prompt_len`."""
        self.validate(prompt_len, config)
        layers = tuple(
            self.init_layer(i, batch, prompt_len, max_new_tokens, config, dtype) for i in range(config.num_layers)
        )
        return KVState(layers=layers, lengths=jnp.zeros((batch,), jnp.int32))

    def validate(self, prompt_len: int, config) -> None:
        """Raise PolicyError when the policy cannot serve a prompt of this length."""

    # ---- attention ------------------------------------------------------------------
    def attend(self, state: SlotKV, q, q_pos, ctx: LayerContext, want_mass: bool = False):
        return attention.attend(
            q,
            state.k,
            state.v,
            q_pos,
            state.pos,
            window=ctx.config.sliding_window,
            want_mass=want_mass,
            implementation=ctx.implementation,
            prefix_cache=ctx.prefix_cache and ctx.phase == "prefill",
        )

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        state = slots.append(state, k, v, q_pos)
        res = self.attend(state, q, q_pos, ctx, want_mass=self.wants_mass(ctx))
        state = self.after_prefill(state, q, q_pos, res, ctx)
        return state, res.out

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        state = slots.append(state, k, v, q_pos)
        res = self.attend(state, q, q_pos, ctx)
        return state, res.out

    def maintenance_period(self, ctx: LayerContext) -> int:
        """Decode steps between two `maintain` calls the decode loop may run (0: no upkeep).
        A policy whose per-token decode does work that only matters every few tokens (a quantizer
        flushing its full-precision window) returns that count; `kvjax.generation`'s decode loop
        then runs that many steps with `ctx.deferred` set, then `maintain` on every layer, instead
        of doing the upkeep inside each step's `decode`."""
        return 0

    def maintain(self, state, ctx: LayerContext):
        """The upkeep `decode` skips when `ctx.deferred` is set (default: none). The decode loop
        also calls it once when it stops, so it must be idempotent and leave a state every other
        consumer can read (a policy may leave work pending between decode steps and settle it
        here)."""
        return state

    # ---- compression ----------------------------------------------------------------
    def wants_mass(self, ctx: LayerContext) -> bool:
        return False

    def after_prefill(self, state, q, q_pos, res, ctx: LayerContext):
        """Hook after a prompt chunk has been appended and attended. Default: after the final
        chunk, a slot cache keeps only `prefill_capacity(ctx.prompt_bound, max_new_tokens)`
        slots (`trim_slots`): prompt tokens are appended in position order, so the slots
        beyond the bound on the true prompt lengths hold only padding."""
        if ctx.final and isinstance(state, SlotKV):
            return trim_slots(state, self.prefill_capacity(ctx.prompt_bound, ctx.max_new_tokens), ctx.prompt_bound)
        return state

    def compress(self, state, ctx: LayerContext, **observations):
        """Return a smaller state. The dense cache never compresses."""
        return state

    # ---- rollback -------------------------------------------------------------------
    def truncate(self, state: KVState, lengths) -> KVState:
        """Roll `state` back to per-row lengths [B] (each at most the row's current length):
        the tokens at positions >= lengths[b] leave the cache as if never appended
        (`kvjax.policies.rows.truncate_state`; per-row write offsets). Raises PolicyError for a
        policy that evicts while decoding: the tokens those steps evicted cannot come back."""
        if self.evicts_on_decode:
            raise PolicyError(
                f"{self.spec()!r} evicts tokens while decoding, so its state cannot be rolled back to "
                "earlier lengths (the evicted tokens are gone); use a dense, quantized or prompt-time "
                "eviction policy"
            )
        return rows.truncate_state(self, state, lengths)

    def truncate_layer(self, layer, lengths: jax.Array):
        """One layer of `truncate`: a slot cache drops the slots at positions >= lengths[b]
        (`slots.truncate_slots`). Other state types override this or raise PolicyError."""
        if isinstance(layer, SlotKV):
            return slots.truncate_slots(layer, lengths)
        raise PolicyError(f"{self.name}: cannot roll back a {type(layer).__name__} state")

    # ---- composition ----------------------------------------------------------------
    #: True when decode() changes which tokens are kept (H2O, StreamingLLM, TOVA...).
    #: Such a policy cannot feed a second policy (Compose checks this).
    evicts_on_decode: ClassVar[bool] = False
    #: True for policies that store the slots another policy selected (quantizers,
    #: low-rank stores): they implement `ingest`.
    stores_slots: ClassVar[bool] = False
    #: False for a policy whose prefilled state is not a `SlotKV` a store can ingest.
    feeds_stores: ClassVar[bool] = True
    #: True for retrieval policies (Quest, A^2ATS): every token is kept (the state holds at
    #: least the dense cache) and each decode step reads a selection of it
    #: (`KVState.kv_bytes_read_per_step`).
    retrieves: ClassVar[bool] = False

    def ingest(self, slots_state: SlotKV, ctx: LayerContext):
        """Take over a prefilled (possibly evicted) `SlotKV` and return this policy's own
        state holding the same tokens (with its decode headroom). Identity by default."""
        return slots_state

    # ---- introspection --------------------------------------------------------------
    @classmethod
    def parameters(cls) -> dict[str, Any]:
        """Constructor parameters with their defaults (for `kvjax policies` and specs)."""
        return {f.name: f.default for f in dataclasses.fields(cls) if f.init}

    def spec(self) -> str:
        """The spec string that rebuilds this policy."""
        args = ",".join(f"{k}={getattr(self, k)}" for k in self.parameters())
        return f"{self.name}:{args}" if args else self.name


def check_budget(budget: float) -> None:
    if not (isinstance(budget, (int, float)) and 0.0 < budget <= 1.0):
        raise PolicyError(f"budget={budget!r} must be a fraction of the prompt to keep, in (0, 1]")


def check_positive(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise PolicyError(f"{name}={value!r} must be an integer >= {minimum}")


def budget_capacity(budget: float, prompt_len: int, minimum: int = 1) -> int:
    """Static slot count for a fraction `budget` of a `prompt_len`-token prompt: the per-row
    count `slots.keep_counts` gives a row of `prompt_len` tokens (at least `minimum`, at most
    the prompt). Counts grow with the length, so it bounds every shorter row's."""
    return slots.keep_count(prompt_len, budget, minimum)


def trim_slots(state: SlotKV, capacity: int, bound: int) -> SlotKV:
    """Keep the first `capacity` slots of a slot cache whose prompt tokens sit in slots below
    `bound` (slot = position, as `slots.append` writes a right-padded prompt): the rest hold
    padding. `fill` drops to at most `bound`, so decoding appends right after the prompts.
    Unchanged when `capacity` is not smaller than the cache."""
    if capacity >= state.capacity:
        return state
    if capacity < bound:
        raise PolicyError(f"cannot trim a slot cache to capacity={capacity} below the prompt bound={bound}")
    return SlotKV(
        k=state.k[:, :, :capacity],
        v=state.v[:, :, :capacity],
        pos=state.pos[:, :, :capacity],
        fill=jnp.minimum(state.fill, bound).astype(jnp.int32),
    )


def tree_nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree_util.tree_leaves(tree)))
