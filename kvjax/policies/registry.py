"""Registry of policies and the spec-string language.

Spec: ``NAME[:key=value,...]`` joined with ``+`` to compose, e.g.
``snapkv:budget=0.2,window=32+kivi:bits=2``. ``dense`` is the uncompressed cache.
"""

from __future__ import annotations

import dataclasses
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
        kwargs[key] = _coerce(cls, key, val)
    return cls(**kwargs)


def parse_policy(spec: str):
    """Build a policy from a spec string (see module doc)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy spec {spec!r} is empty; try 'dense' or 'snapkv:budget=0.2'")
    parts = [parse_one(p) for p in spec.split("+")]
    if len(parts) == 1:
        return parts[0]
    from .compose import Compose

    return Compose(*parts)


def list_policies() -> dict[str, dict[str, Any]]:
    """{name: {parameter: default}} for every registered policy."""
    return {name: cls.parameters() for name, cls in sorted(REGISTRY.items())}
