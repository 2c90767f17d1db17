"""Argument parsing shared by the `kvjax eval`, `kvjax sweep` and `kvjax report` commands: the
comma-separated lists, trials and task options they take on the command line."""

from __future__ import annotations

import os

from ..policies.registry import REGISTRY


def split_specs(text: str) -> list[str]:
    """'dense,snapkv:budget=0.2,window=32,tova' -> ['dense', 'snapkv:budget=0.2,window=32',
    'tova']: a comma piece that is `key=value` without a policy name continues the previous
    spec (';' always separates)."""
    out: list[str] = []
    for group in text.split(";"):
        for piece in filter(None, (p.strip() for p in group.split(","))):
            head = piece.split("+")[0].split(":")[0].strip().lower()
            continues = "=" in piece and ":" not in piece and head not in REGISTRY and "+" not in piece
            if continues and out:
                out[-1] += "," + piece
            else:
                out.append(piece)
    if not out:
        raise ValueError(f"no policy specs in {text!r}")
    return out


def split_list(text: str, kind=str, name: str = "value") -> list:
    """'0.5,0.2' -> [0.5, 0.2] with a clear error naming the bad item."""
    out = []
    for piece in filter(None, (p.strip() for p in text.split(","))):
        try:
            out.append(kind(piece))
        except ValueError:
            raise ValueError(f"{name} {piece!r} is not a valid {kind.__name__}") from None
    return out


def parse_trials(text: str):
    """'10' -> 10; 'passkey=20,kv_retrieval=10' -> {'passkey': 20, 'kv_retrieval': 10}
    (values checked by `sweep.check_trials`)."""
    if "=" not in text:
        values = split_list(text, int, "trials")
        if len(values) != 1:
            raise ValueError(f"trials {text!r} must be one integer or TASK=INTEGER,...")
        return values[0]
    out = {}
    for piece in split_list(text, str, "trials"):
        task, _, n = piece.partition("=")
        try:
            out[task.strip()] = int(n)
        except ValueError:
            raise ValueError(f"trials {piece!r} must be TASK=INTEGER") from None
    return out


def _value(text: str):
    """'3' -> 3, 'true' / 'false' -> True / False, anything else unchanged."""
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    return int(t) if t.lstrip("-").isdigit() else t


def parse_options(items) -> dict:
    """['kv_retrieval:pairs=2,turns=2', 'mix:kv_first=true'] -> {'kv_retrieval': {'pairs': 2,
    'turns': 2}, 'mix': {'kv_first': True}} (names and values checked by `tasks.check_options`)."""
    out: dict = {}
    for item in items or ():
        task, sep, args = item.partition(":")
        if not sep:
            raise ValueError(f"task option {item!r} must look like TASK:key=value,...")
        for kv in filter(None, args.split(",")):
            key, eq, val = kv.partition("=")
            if not eq:
                raise ValueError(f"task option {kv!r} must be key=value")
            out.setdefault(task.strip(), {})[key.strip()] = _value(val)
    return out


def text_name(text_file: str | None, default: str = "kjv-judges") -> str:
    """The text argument for the eval functions, checking a given file is readable."""
    if text_file is None:
        return default
    if text_file not in ("kjv-judges", "pydoc") and not os.access(os.path.expanduser(text_file), os.R_OK):
        raise ValueError(f"text file {text_file!r} does not exist or is not readable")
    return text_file
