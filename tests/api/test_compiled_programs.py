"""Regression guards on the compiled programs of every policy (XLA:CPU, optimised HLO).

A decode step must be O(context) only in the attention's own read of the cache: no copy of a
context-sized state buffer inside the decode loop (a whole-cache copy per layer per step makes
compressed decoding slower than dense). A prefill must never build an array of prompt tokens x
vocabulary (full-sequence logits). The checks read the compiled or lowered program, so they fail
on what XLA actually runs.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest

from kvjax.generation import decode, prefill
from kvjax.policies import REGISTRY, parse_policy
from kvjax.sampling import Sampler

pytestmark = pytest.mark.slow  # optimised compiles (conftest enables XLA's passes for `slow` tests)

BATCH, PROMPT, NEW = 2, 128, 8
COMPOSED = ("snapkv:budget=0.2+kivi:bits=2", "pyramidkv:budget=0.25+kivi:bits=4", "knorm:budget=0.25+kivi:bits=8")

_SHAPE = re.compile(r"= (\w+)\[([\d,]*)\]")


NAMES = sorted(REGISTRY) + list(COMPOSED)

#: Known per-step copies inside the decode loop (XLA:CPU), each a defect to fix, not a rule:
#: {policy name: reason}; each becomes a strict xfail. None at present: the policies that evict
#: while decoding leave their eviction pending and apply it before the next step's attention
#: (lazy eviction, `kvjax.policies.eviction`), so no step writes a buffer attention has read.
KNOWN_DECODE_COPIES: dict[str, str] = {}


def _policy(name, calibrations):
    """A registered policy with small budgets and windows (so eviction happens), or a spec."""
    if name not in REGISTRY:
        return parse_policy(name)
    cls = REGISTRY[name]
    fields, args = cls.parameters(), {}
    if "budget" in fields:
        args["budget"] = 0.25
    if "window" in fields:
        args["window"] = 8
    if "calibration" in fields:
        args["calibration"] = calibrations[name]
    return cls(**args)


def _computations(text: str) -> dict[str, list[str]]:
    """HLO module text -> {computation name: instruction lines}."""
    comps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{") and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name and line.startswith("  "):
            comps[name].append(line.strip())
    return comps


def _loop_bodies(comps: dict[str, list[str]]) -> set[str]:
    """Every computation a while loop runs (bodies, conditions, and what they call or branch to),
    excluding fusion computations (their copies are in-register layout changes, not buffers)."""
    todo = [m for lines in comps.values() for ln in lines for m in re.findall(r"body=%?([\w.\-]+)", ln)]
    seen: set[str] = set()
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for ln in comps[c]:
            if " fusion(" in ln:
                continue
            todo += re.findall(
                r"(?:body|condition|to_apply|branch_computations=\{|true_computation|false_computation)=?%?([\w.\-]+)",
                ln,
            )
            for group in re.findall(r"branch_computations=\{([^}]*)\}", ln):
                todo += [g.strip().lstrip("%") for g in group.split(",")]
    return seen


def _prefill_state(policy, params, cfg, prompt):
    tokens = jax.ShapeDtypeStruct((BATCH, prompt), jnp.int32)
    lengths = jax.ShapeDtypeStruct((BATCH,), jnp.int32)
    kw = dict(config=cfg, policy=policy, max_new_tokens=NEW)
    return jax.eval_shape(lambda p, t, n: prefill(p, t, n, **kw), params, tokens, lengths)


def _context_sized(policy, params, cfg) -> set[tuple[str, tuple]]:
    """(dtype, shape) in a PROMPT-token state of the leaves whose size grows with the context:
    those whose shapes differ between 16 x and 64 x PROMPT-token prefills (shapes only), where
    bounded buffers such as a residual window have reached their full size."""
    _, state = _prefill_state(policy, params, cfg, PROMPT)
    _, mid = _prefill_state(policy, params, cfg, 16 * PROMPT)
    _, big = _prefill_state(policy, params, cfg, 64 * PROMPT)
    leaves = zip(*(jax.tree.leaves(x.layers) for x in (state, mid, big)))
    return {(str(a.dtype), tuple(a.shape)) for a, m, g in leaves if m.shape != g.shape}


def _hlo_shape(line: str) -> tuple[str, tuple] | None:
    m = _SHAPE.search(line)
    if not m:
        return None
    names = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "s32": "int32", "u32": "uint32",
             "s8": "int8", "u8": "uint8", "pred": "bool"}  # fmt: skip
    return names.get(m.group(1), m.group(1)), tuple(int(d) for d in filter(None, m.group(2).split(",")))


@pytest.fixture(scope="module")
def abstract_params(tiny_params):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tiny_params)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_DECODE_COPIES[n])) if n in KNOWN_DECODE_COPIES else n for n in NAMES],
)  # fmt: skip
def test_decode_loop_copies_no_context_sized_buffer(name, tiny_calibrations, abstract_params, tiny_config):
    """Inside the compiled decode loop, no `copy` of a buffer shaped like a state leaf whose size
    grows with the context (bounded leaves such as a residual window may be copied: O(1) in the
    context)."""
    pol = _policy(name, tiny_calibrations)
    logits, state = _prefill_state(pol, abstract_params, tiny_config, PROMPT)
    compiled = decode.lower(
        abstract_params, state, logits, jax.random.key(0), config=tiny_config, policy=pol,
        max_new_tokens=NEW, sampler=Sampler(), stop_ids=(2,),
    ).compile()  # fmt: skip
    sized = _context_sized(pol, abstract_params, tiny_config)
    assert sized, f"{pol.spec()}: no state leaf grows with the prompt?"
    comps = _computations(compiled.as_text())
    bodies = _loop_bodies(comps)
    assert bodies, f"{pol.spec()}: no while loop found in the compiled decode"
    copies = [ln[:120] for c in bodies for ln in comps[c] if " copy(" in ln and _hlo_shape(ln) in sized]
    assert not copies, f"{pol.spec()}: context-sized copies inside the decode loop: {copies}"


def test_prefill_builds_no_sequence_by_vocabulary_array(tiny_calibrations, abstract_params, tiny_config):
    """No array of (prompt tokens x vocabulary) anywhere in prefill (logits are taken at each
    row's last token only). Read from the lowered program, before XLA can fuse it away."""
    vocab, bad = tiny_config.vocab_size, {}
    for pol in (_policy(n, tiny_calibrations) for n in NAMES):
        text = prefill.lower(
            abstract_params, jax.ShapeDtypeStruct((BATCH, PROMPT), jnp.int32),
            jax.ShapeDtypeStruct((BATCH,), jnp.int32), config=tiny_config, policy=pol, max_new_tokens=NEW,
        ).as_text()  # fmt: skip
        for m in re.finditer(r"tensor<([\dx]+)x\w+>", text):
            dims = [int(d) for d in m.group(1).split("x")]
            if vocab in dims and (PROMPT in dims or BATCH * PROMPT in dims):
                bad.setdefault(pol.spec(), set()).add(m.group(0))
    assert not bad, f"full-sequence x vocabulary arrays in prefill: {bad}"
