"""The token-budget scheduler of `kvjax.serve.Engine`: pure Python, no jax.

Sarathi-Serve's stall-free batching (Agrawal et al., "Taming Throughput-Latency Tradeoff in
LLM Inference with Sarathi-Serve"): every step first gives one decode token to each running
request, then spends what is left of the token budget on prompt chunks of the requests being
prefilled, oldest first, so a long prompt never stalls the decodes. `policy="prefill-first"`
is the baseline it is compared with: while any prompt is waiting, a step runs prompt chunks
only (up to the budget) and the decodes wait.

Chunk widths are what the compiled prefill programs are specialised on, so they come from a
small set (`width_up` / `width_down`): powers of two from `min_chunk` to QUANTUM (64), then
multiples of QUANTUM. A chunk that does not end its prompt has such a width exactly; a
prompt's last chunk is its remainder padded up to one. The padded width is what counts
against the budget, and chunks stay inside the prompt's bucket (`Prefilling.bucket`, at least
`prefill_bucket(length)`): chunk starts are multiples of `min_chunk`, and a last chunk pads
by less than QUANTUM, so its padded slots never run past the slots the request's prefill state
was sized for.

    plan = schedule(decoding=[3, 5], prefilling=[Prefilling(7, 100, 0, 128)], budget=64)
    plan.decodes == [3, 5]; plan.chunks == [Chunk(7, 32, 32, False)]
"""

from __future__ import annotations

import dataclasses

SCHEDULES = ("stall-free", "prefill-first")


#: Chunk widths above this are its multiples (below it, powers of two).
QUANTUM = 64


def pow2_ceil(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def pow2_floor(n: int) -> int:
    """Largest power of two <= n (n >= 1)."""
    return 1 << (int(n).bit_length() - 1)


def width_up(n: int, min_chunk: int) -> int:
    """The chunk width that holds n tokens: a power of two >= min_chunk up to QUANTUM, else
    the next multiple of QUANTUM."""
    return max(min_chunk, pow2_ceil(n)) if n <= QUANTUM else -(-n // QUANTUM) * QUANTUM


def width_down(n: int) -> int:
    """The widest chunk width <= n (n >= 1)."""
    return pow2_floor(n) if n < QUANTUM else n // QUANTUM * QUANTUM


def prefill_bucket(length: int) -> int:
    """Slots of the prefill state of a `length`-token prompt: length + QUANTUM (room for the
    last chunk's padding) rounded up to an eighth of its power of two (a multiple of QUANTUM),
    so nearby lengths share compiled programs."""
    n = length + QUANTUM
    step = max(QUANTUM, pow2_ceil(n) // 8)
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class Prefilling:
    """A request whose prompt is being prefilled: `length` prompt tokens, `fed` of them in
    already (a multiple of min_chunk), `bucket` the slots its prefill state holds (at least
    `prefill_bucket(length)`, a multiple of min_chunk)."""

    rid: int
    length: int
    fed: int
    bucket: int


@dataclasses.dataclass(frozen=True)
class Chunk:
    """`tokens` prompt tokens of request `rid`, run as one call padded to `width` (a power of
    two); `final`: the chunk ends the prompt (the policy compresses after it)."""

    rid: int
    tokens: int
    width: int
    final: bool


@dataclasses.dataclass(frozen=True)
class Plan:
    """One engine step: the requests that get a decode token, then the prompt chunks."""

    decodes: list[int]
    chunks: list[Chunk]

    @property
    def tokens(self) -> int:
        """Tokens the step computes: one per decode plus every chunk's padded width."""
        return len(self.decodes) + sum(c.width for c in self.chunks)


def chunk_for(p: Prefilling, room: int, min_chunk: int, min_final: int = 0) -> Chunk | None:
    """The largest chunk of `p` whose padded width fits `room` tokens (None: none fits); a
    chunk that does not end the prompt leaves at least `min_final` tokens for the last one."""
    left = p.length - p.fed
    if left < 1:
        raise ValueError(f"request {p.rid} has no prompt tokens left (length={p.length}, fed={p.fed})")
    width = width_up(left, min_chunk)
    if width <= room and p.fed + width <= p.bucket:
        return Chunk(p.rid, left, width, True)
    step = min(room, left - min_final, p.bucket - p.fed)
    if step < min_chunk:
        return None
    width = width_down(step)
    return Chunk(p.rid, width, width, False)


def min_budget(decodes: int, min_chunk: int, min_final: int) -> int:
    """The smallest token budget that always makes progress: `decodes` tokens plus the widest
    last chunk (a remainder below min_final + min_chunk, padded up, `width_up`)."""
    return decodes + width_up(min_final + min_chunk - 1, min_chunk)


def schedule(
    decoding: list[int],
    prefilling: list[Prefilling],
    budget: int,
    *,
    min_chunk: int = 16,
    min_final: int = 0,
    policy: str = "stall-free",
) -> Plan:
    """The next step (module doc). decoding: ids of the running requests (one token each);
    prefilling: requests with prompt tokens left, oldest first; budget: tokens per step (must
    cover every decode plus `min_budget(0, min_chunk, min_final)`); min_final: the fewest
    tokens a prompt's last chunk holds (when the prompt has that many: a policy's
    observation window must lie in the chunk it compresses after)."""
    if policy not in SCHEDULES:
        raise ValueError(f"policy={policy!r}; expected one of {SCHEDULES}")
    if min_chunk < 1 or min_chunk & (min_chunk - 1) or min_chunk > QUANTUM:
        raise ValueError(f"min_chunk={min_chunk} must be a power of two <= {QUANTUM}")
    if budget < min_budget(len(decoding), min_chunk, min_final):
        raise ValueError(
            f"token budget {budget} < {min_budget(len(decoding), min_chunk, min_final)}: it must hold "
            f"{len(decoding)} decodes plus a last chunk of up to {min_final + min_chunk - 1} tokens"
        )
    if policy == "prefill-first" and prefilling:
        decodes, room = [], budget
    else:
        decodes, room = list(decoding), budget - len(decoding)
    chunks = []
    for p in prefilling:
        c = chunk_for(p, room, min_chunk, min_final)
        if c is None:
            break  # oldest first: a younger prompt does not overtake one that did not fit
        chunks.append(c)
        room -= c.width
    return Plan(decodes, chunks)
