"""Registry of policies, the spec-string language, and each parameter's valid range.

Spec: ``NAME[:key=value,...]`` joined with ``+`` to compose, e.g.
``snapkv:budget=0.2,window=32+kivi:bits=2``. ``dense`` is the uncompressed cache. A key
may appear once per policy; see `Compose` for which policies compose. A low-rank store
followed by a quantizer (``cskv:k_density=0.5+kivi:bits=4``) becomes one policy that
quantizes its own coefficients (the store's `absorb`).

`RANGES` states, for every parameter of every registered policy, the values its
constructor accepts (what `kvjax policies --verbose` prints); a test checks each range
against the constructor, so a new policy is registered with `@register` in its own file
and one entry here.
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any

REGISTRY: dict[str, type] = {}


def register(cls):
    """Class decorator: add a policy class to the registry under `cls.name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no `name`")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"policy name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def _coerce(cls, key: str, raw: str) -> Any:
    hints = typing.get_type_hints(cls)
    kind = hints.get(key, str)
    text = raw.strip()
    origin = typing.get_origin(kind)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if text.lower() in ("none", "null"):
            return None
        kind = args[0] if args else str
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is tuple:
            inner = typing.get_args(kind)[0]
            return tuple(inner(x) for x in text.split("/") if x)
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(
            f"policy {cls.name!r}: {key}={raw!r} is not a valid {getattr(kind, '__name__', kind)}"
        ) from None


def parse_one(text: str):
    """One ``NAME[:key=value,...]`` part of a spec."""
    name, _, argtext = text.strip().partition(":")
    name = name.strip().lower()
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for item in filter(None, (s.strip() for s in argtext.split(","))):
        key, eq, val = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"policy {name!r}: expected key=value, got {item!r}")
        if key not in fields:
            raise ValueError(f"policy {name!r} has no parameter {key!r}; parameters: {sorted(fields)}")
        if key in kwargs:
            raise ValueError(f"policy {name!r}: {key} is given twice in {text.strip()!r}")
        kwargs[key] = _coerce(cls, key, val)
    return cls(**kwargs)


def parse_policy(spec: str):
    """Build a policy from a spec string (see module doc)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy spec {spec!r} is empty; try 'dense' or 'snapkv:budget=0.2'")
    texts = spec.split("+")
    if any(not t.strip() for t in texts):
        raise ValueError(f"policy spec {spec!r} has an empty part around '+'; e.g. 'snapkv:budget=0.2+kivi:bits=2'")
    parts = [parse_one(t) for t in texts]
    for i in range(len(parts) - 2, -1, -1):  # a low-rank store quantizes its own coefficients
        if hasattr(parts[i], "absorb"):
            parts[i : i + 2] = [parts[i].absorb(parts[i + 1])]
    if len(parts) == 1:
        return parts[0]
    from .compose import Compose

    return Compose(*parts)


def list_policies() -> dict[str, dict[str, Any]]:
    """{name: {parameter: default}} for every registered policy."""
    return {name: cls.parameters() for name, cls in sorted(REGISTRY.items())}


# ---- parameter ranges -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Range:
    """Values a parameter accepts: a numeric interval (`low`/`high`, open or closed; None =
    unbounded), or `choices`; `note`: a condition that depends on other values (the model's
    head_dim, another parameter), checked where those are known."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    note: str = ""

    def __str__(self) -> str:
        if self.choices:
            text = (
                "true or false" if set(self.choices) == {True, False} else "one of " + ", ".join(map(str, self.choices))
            )
        elif self.low is not None and self.high is not None:
            text = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high}"
        else:
            text = ""
        return f"{text}; {self.note}" if text and self.note else text or self.note


def at_least(n: int, note: str = "") -> Range:
    return Range(low=n, note=note)


FRACTION_KEPT = Range(0, 1, low_open=True, note="fraction of the prompt kept")
FLAG = Range(choices=(True, False))
BITS = Range(choices=(2, 3, 4, 8))
CALIBRATION = Range(note="directory of a calibration artifact ('' = the one shipped for SmolLM2)")
RESIDUAL = at_least(0, "recent tokens kept in full precision")
OFFLOAD = Range(choices=("auto", "host", "device"), note="where host-resident leaves live (kvjax.host)")
QUESTION = Range(
    choices=("dense", "sparse"), note="how a new turn's question tokens attend: every token, or a selection"
)

RANGES: dict[str, dict[str, Range]] = {
    "dense": {},
    "snapkv": {"budget": FRACTION_KEPT, "window": at_least(1), "kernel": at_least(1)},
    "pyramidkv": {"budget": FRACTION_KEPT, "window": at_least(1), "kernel": at_least(1), "beta": at_least(1)},
    "adakv": {"budget": FRACTION_KEPT, "window": at_least(1), "kernel": at_least(1), "safeguard": Range(0, 1)},
    "chunkkv": {
        "budget": FRACTION_KEPT,
        "chunk": at_least(1),
        "scorer": Range(choices=("snapkv", "tova", "knorm")),
        "window": at_least(1),
        "kernel": at_least(1),
    },
    "knorm": {"budget": FRACTION_KEPT},
    "tova": {"budget": FRACTION_KEPT, "on_decode": FLAG},
    "h2o": {"budget": FRACTION_KEPT, "recent": Range(0, 1, high_open=True), "normalize": FLAG},
    "streaming": {"budget": FRACTION_KEPT, "sink": at_least(0)},
    "elastic": {"budget": FRACTION_KEPT, "sink": at_least(0), "offset": at_least(1)},
    "kvmerger": {"budget": FRACTION_KEPT, "threshold": Range(-1, 1, low_open=True), "window": at_least(0)},
    "locret": {
        "budget": FRACTION_KEPT,
        "chunk": at_least(0, "0 = no chunked prefill"),
        "stabilizers": at_least(0),
        "calibration": CALIBRATION,
    },
    "kivi": {
        "bits": BITS,
        "group": Range(note="a positive multiple of 32 // bits (32 for 3 bits) that divides head_dim"),
        "residual": at_least(0, "a multiple of group"),
        "v_bits": Range(choices=(0, 2, 3, 4, 8), note="0 = bits"),
        "layout": Range(choices=("auto", "standard", "fragments")),
    },
    "kvquant": {
        "bits": Range(choices=(2, 3, 4)),
        "outliers": Range(0, 0.5, high_open=True),
        "qnorm": FLAG,
        "sinks": at_least(0),
        "residual": RESIDUAL,
        "calibration": CALIBRATION,
    },
    "zipcache": {
        "bits": BITS,
        "high_bits": Range(choices=(0, 2, 3, 4, 8), note="0 = 4 for 2/3-bit, 8 for 4-bit"),
        "salient": Range(0, 1),
        "stream_gap": at_least(1),
        "residual": RESIDUAL,
    },
    "rotatekv": {
        "bits": BITS,
        "group": Range(note="0 = the whole head, else a divisor of head_dim"),
        "clip": Range(0, 1, low_open=True),
        "sinks": at_least(0),
        "head_group": at_least(1),
        "residual": RESIDUAL,
        "calibration": CALIBRATION,
    },
    "rtn": {"bits": BITS, "residual": RESIDUAL},
    "a2ats": {
        "topk": Range(0, 1, low_open=True, note="fraction of the tokens seen each query head retrieves"),
        "window": at_least(0, "newest tokens always read"),
        "sinks": at_least(0, "first tokens always read"),
        "calibration": CALIBRATION,
    },
    "quest": {
        "budget": Range(0, low_open=True, note="a fraction of the prompt (<= 1) or whole tokens (> 1) read per step"),
        "page": at_least(1, "slots per page; the sparse decode kernel takes powers of two >= 16 (GPU, CPU interpret)"),
        "dense_layers": at_least(0, "fewer than the model's layers"),
        "gqa": Range(choices=("max", "union")),
        "question": QUESTION,
    },
    "triforce_retrieval": {
        "budget": Range(0, low_open=True, note="a fraction of the prompt (<= 1) or whole tokens (> 1), in chunks"),
        "chunk": at_least(1, "consecutive keys per chunk"),
    },
    "shadowkv": {
        "rank": at_least(0, "0 = the paper's 160/1024 of the key channels N*H; at most N*H"),
        "budget": Range(0, low_open=True, note="tokens selected per step: a fraction (<= 1) or whole tokens (> 1)"),
        "chunk": at_least(1, "tokens per chunk; must divide the prompt bucket and prefill_chunk"),
        "local": at_least(0, "last prompt chunks kept exact"),
        "outliers": Range(0, 1, note="exact outlier chunks, a fraction of the selected chunks"),
        "offload": OFFLOAD,
        "question": QUESTION,
    },
    "cskv": {
        "k_density": Range(0, 1, low_open=True, note="fraction of the N*H key channels kept"),
        "v_density": Range(0, 1, low_open=True, note="fraction of the N*H value channels kept"),
        "window": RESIDUAL,
        "group": at_least(1, "tokens per flush; with bits, a multiple of 32 // bits"),
        "bits": Range(choices=(0, 2, 4, 8), note="0 = float coefficients; '+kivi:bits=B' sets it"),
        "calibration": CALIBRATION,
    },
    "matryoshka": {
        "k_rank": at_least(1, "directions kept per KV head; at most head_dim"),
        "v_rank": at_least(1, "directions kept per KV head; at most head_dim"),
        "schedule": Range(note="JSON file of per-(layer, head) ranks ('' = k_rank / v_rank everywhere)"),
        "calibration": Range(note="checkpoint directory ('' = the one shipped for SmolLM2)"),
    },
    "offload": {
        "window": at_least(1, "recent tokens on the device (from a block boundary)"),
        "block": at_least(1, "tokens per offloaded block; must divide the prompt bucket and prefill_chunk"),
        "topk": at_least(1, "blocks a question retrieves"),
        "sinks": at_least(0, "first tokens on the device"),
        "offload": OFFLOAD,
        "question": QUESTION,
        "select": Range(
            choices=("auto", "attention", "cosine"),
            note="block scores: the question's attention mass (needs question=dense), ReKV's cosine, or auto",
        ),
    },
    "bfp": {
        "bits": BITS,
        "block_size": Range(note="must divide head_dim"),
        "reorder": FLAG,
        "residual": RESIDUAL,
        "calibration": CALIBRATION,
    },
    "kv4": {
        "bits": BITS,
        "block_size": at_least(1, "must divide head_dim"),
        "outlier_blocks": at_least(0),
        "residual": RESIDUAL,
        "calibration": CALIBRATION,
    },
}


def describe(name: str) -> tuple[str, dict[str, tuple[Any, Range]]]:
    """(one-line description, {parameter: (default, Range)}) of a registered policy. The
    description is the first line of the policy module's docstring (the method and what it
    keeps), else of the class's."""
    if name not in REGISTRY:
        raise ValueError(f"unknown policy {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    doc = importlib.import_module(cls.__module__).__doc__ or cls.__doc__ or ""
    line = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    ranges = RANGES.get(name, {})
    return line, {k: (v, ranges.get(k, Range())) for k, v in cls.parameters().items()}
