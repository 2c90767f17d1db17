"""Composition of policies: the first selects tokens at prefill, the next ones store them.

`Compose(SnapKV(budget=0.2), KIVI(bits=2))`: SnapKV prefills and evicts on a full-precision
cache, then KIVI ingests the kept slots and quantizes them; decode runs on KIVI's state.
Both savings show in the state's bytes.

The selector never decodes, so it runs with no decode headroom (`max_new_tokens=0`): it
hands over exactly its kept slots, and the store sizes its own state from them (their
count and the batch's bound on true prompt lengths) plus the real headroom.
"""

from __future__ import annotations

import dataclasses

from ..state import LayerContext
from .base import Policy, PolicyError


@dataclasses.dataclass(frozen=True, init=False)
class Compose(Policy):
    """Compose(selector, store): see module doc. Spec: ``a:...+b:...``. The selector must not
    evict while decoding; the store is the one policy that stores the kept slots (a quantizer
    or another store)."""

    name = "compose"
    policies: tuple = ()

    def __init__(self, *policies: Policy):
        if len(policies) < 2:
            raise PolicyError(f"Compose needs at least two policies, got {len(policies)}")
        for p in policies:
            if not isinstance(p, Policy):
                raise PolicyError(f"Compose takes Policy objects, got {p!r}")
        for p in policies[:-1]:
            if p.evicts_on_decode:
                raise PolicyError(
                    f"cannot compose {p.name!r} before {policies[-1].name!r}: {p.name} evicts during decoding, "
                    "so the tokens it keeps change after the next policy has stored them"
                )
        for p in policies[:-1]:
            if not p.feeds_stores:
                why = getattr(p, "feeds_stores_note", "") or "its state is not a per-head slot cache"
                raise PolicyError(
                    f"cannot compose {p.name!r} before {policies[-1].name!r}: {p.name} keeps its tokens in a "
                    f"layout no store ingests ({why})"
                )
        for p in policies[1:]:
            if not p.stores_slots:
                raise PolicyError(
                    f"cannot compose {p.name!r} after {policies[0].name!r}: {p.name} does not store another "
                    "policy's kept slots (only quantizers and other stores can follow)"
                )
        stores = [p for p in policies if p.stores_slots]
        if len(stores) > 1:
            raise PolicyError(
                f"cannot compose {stores[1].name!r} after {stores[0].name!r}: both store the kept tokens (quantizers "
                "and other stores), and a cache has one store; keep one, e.g. 'snapkv:budget=0.2+kivi:bits=2'"
            )
        object.__setattr__(self, "policies", tuple(policies))

    @classmethod
    def parameters(cls):
        return {}

    def spec(self) -> str:
        return "+".join(p.spec() for p in self.policies)

    @property
    def evicts_on_decode(self) -> bool:  # type: ignore[override]
        return self.policies[-1].evicts_on_decode

    def validate(self, prompt_len, config):
        for p in self.policies:
            p.validate(prompt_len, config)

    def prefill_capacity(self, prompt_len, max_new_tokens):
        return self.policies[0].prefill_capacity(prompt_len, 0)

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        return self.policies[0].init_layer(layer, batch, prompt_len, 0, config, dtype)

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext):
        state, out = self.policies[0].prefill(state, q, k, v, q_pos, dataclasses.replace(ctx, max_new_tokens=0))
        if ctx.final:
            for p in self.policies[1:]:
                state = p.ingest(state, ctx)
        return state, out

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext):
        return self.policies[-1].decode(state, q, k, v, q_pos, ctx)

    def maintenance_period(self, ctx: LayerContext) -> int:
        return self.policies[-1].maintenance_period(ctx)

    def maintain(self, state, ctx: LayerContext):
        return self.policies[-1].maintain(state, ctx)

    def truncate_layer(self, layer, lengths):
        """The store decodes, so the store rolls its state back."""
        return self.policies[-1].truncate_layer(layer, lengths)
