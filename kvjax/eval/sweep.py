"""The sweep runner: tasks x policies x budgets x contexts x seeds x modes, resumable.

    cells = plan(["passkey", "ppl"], ["dense", "snapkv"], [0.5, 0.2], [4096], [0])
    run_sweep(model, cells, "out/", trials={"passkey": 20})

Results go to `out/cells.jsonl`, one JSON line per finished cell (status "ok" with
accuracy or ppl, KV bytes, compression ratio, times; or status "error" with the message —
a failing cell never stops the run). Each batch of a cell is first written to
`out/parts.jsonl`, so an interrupted run resumes at the next unfinished batch and never
redoes a finished cell of the task's current generator version (`episodes.task_version`,
stored in every record; records of an older version are redone). Within one (task, context,
seed, mode) group the dense prefill of each batch is captured once and shared by every policy
that `shares_prefill`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from .. import jit_cache
from ..policies.registry import parse_policy
from .episodes import EPISODES, check, make_episodes, task_version
from .session import MODES, SessionResult, capture_batch, pads_safely, prefill_ids, run_session
from .shared import shares_prefill
from .texts import load_text

TASKS = tuple(EPISODES) + ("ppl",)
ENGINES = ("kvjax", "kvpress")
DEFAULT_TRIALS = {"passkey": 20, "kv_retrieval": 10, "ppl": 1}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One result: `policy` is a kvjax spec (for engine "kvpress", the kvjax spec of the
    equivalent press); mode "inside" / "excluded" (the question in the compressed prefill
    or appended after it; "-" for ppl)."""

    engine: str
    task: str
    policy: str
    context: int
    seed: int
    mode: str

    @property
    def key(self) -> str:
        return f"{self.engine}|{self.task}|{self.policy}|{self.context}|{self.seed}|{self.mode}"


def expand_policies(specs, budgets) -> list[str]:
    """Each spec at each budget (`budget=` added to the first part of specs that take one
    and do not set it); specs without a budget parameter (dense) once, unchanged."""
    out = []
    for spec in specs:
        first, plus, rest = spec.partition("+")
        pol = parse_policy(spec)  # raises on unknown names / parameters
        lead = pol.policies[0] if hasattr(pol, "policies") else pol
        if "budget" not in type(lead).parameters() or "budget=" in first or not budgets:
            out.append(pol.spec())
            continue
        for b in budgets:
            sep = "," if ":" in first else ":"
            out.append(parse_policy(f"{first}{sep}budget={b}{plus}{rest}").spec())
    return list(dict.fromkeys(out))


def plan(tasks, policies, budgets, contexts, seeds, modes=("inside",), engines=("kvjax",)) -> list[Cell]:
    """All cells, grouped so that each (engine, context, task, seed, mode) is contiguous."""
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; expected one of {TASKS}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected one of {MODES}")
    for e in engines:
        if e not in ENGINES:
            raise ValueError(f"unknown engine {e!r}; expected one of {ENGINES}")
    specs = expand_policies(policies, budgets)
    cells = []
    for e in engines:
        for c in contexts:
            for t in tasks:
                for s in seeds:
                    for m in ("-",) if t == "ppl" else modes:
                        cells += [Cell(e, t, p, c, s, m) for p in specs]
    return cells


def read_jsonl(path: str) -> list[dict]:
    """Records of a JSON-lines file; a truncated last line (interrupted write) is skipped."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def _write(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


_BYTES: dict = {}


def _state_bytes(model, policy, batch: int, width: int) -> int:
    """Bytes of the state right after prefilling a `width`-token bucket (no decode headroom)."""
    key = (id(model), policy, batch, width)
    if key not in _BYTES:
        _BYTES[key] = _eval_bytes(model, policy, batch, width)
    return _BYTES[key]


def _eval_bytes(model, policy, batch, width):
    import jax
    import jax.numpy as jnp

    from ..generate import prefill

    toks = jax.ShapeDtypeStruct((batch, width), jnp.int32)
    lens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    shapes = jax.eval_shape(
        lambda t, l: (
            prefill(model.params, t, l, config=model.config, policy=policy, max_new_tokens=0, dtype=model.dtype)[
                1
            ].layers
        ),
        toks,
        lens,
    )
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(shapes))


def _aggregate(cell: Cell, parts: list[dict]) -> dict:
    parts = sorted(parts, key=lambda p: p["batch"])
    correct = [c for p in parts for c in p["correct"]]  # per episode, per turn
    turns = np.array(correct, dtype=float)
    warm = parts[1:] or parts  # the first batch of a policy includes jit compilation
    episodes = sum(p["episodes"] for p in warm)
    out = {
        **dataclasses.asdict(cell),
        "status": "ok",
        "task_version": task_version(cell.task),
        "trials": len(correct),
        "accuracy": float(turns.mean()),
        "turn_accuracy": turns.mean(axis=0).tolist(),
        "correct": int(turns.sum()),
        "questions": int(turns.size),
    }
    for k in ("kv_bytes", "kv_bytes_held", "dense_kv_bytes"):
        out[k] = float(np.mean([p[k] for p in parts]))
    out["compression_ratio"] = out["kv_bytes"] / max(out["dense_kv_bytes"], 1.0)
    for k in ("prefill_s", "decode_s"):
        out[k] = float(sum(p[k] for p in warm) / episodes)
    out["shared_capture"] = parts[0]["shared_capture"]
    out["devices"] = sorted({p.get("device", "unrecorded") for p in parts})  # where the batches ran
    out["samples"] = [s for p in parts for s in p["samples"]][:40]
    return out


def is_current(record: dict) -> bool:
    """Whether a cells / parts record was made by its task's current generator version."""
    task = record["task"] if "task" in record else record["key"].split("|")[1]
    return record.get("task_version", 1) == task_version(task)


def _error(cell: Cell, e: Exception) -> dict:
    return {
        **dataclasses.asdict(cell),
        "status": "error",
        "task_version": task_version(cell.task),
        "error": f"{type(e).__name__}: {e}",
    }


def _device(engine: str) -> str:
    """What ran the cell: the jax device kind (kvjax) or torch's device (kvpress, CPU torch)."""
    import jax

    return "cpu (torch)" if engine == "kvpress" else jax.devices()[0].device_kind


def _part(cell, b, episodes, res: SessionResult, model, pol, width) -> dict:
    n = len(episodes)
    correct = [[check(o, t.answer) for o, t in zip(outs, e.turns)] for outs, e in zip(res.outputs, episodes)]
    return {
        "key": cell.key,
        "batch": b,
        "task_version": task_version(cell.task),
        "episodes": n,
        "correct": correct,
        "kv_bytes": res.kv_bytes if cell.engine == "kvpress" else _state_bytes(model, pol, n, width) / n,
        "kv_bytes_held": res.kv_bytes,
        "dense_kv_bytes": res.dense_kv_bytes,
        "prefill_s": res.capture_s + res.compress_s,
        "decode_s": res.append_s + res.decode_s,
        "shared_capture": cell.engine == "kvpress" or shares_prefill(pol),
        "device": _device(cell.engine),
        "samples": [
            {"depth": e.depth, "answers": [t.answer for t in e.turns], "outputs": o}
            for e, o in zip(episodes, res.outputs)
        ],
    }


def _run_group(model, cells, state, trials, text, batch_size, options, tick, hf=None):
    """Run one (engine, task, context, seed, mode) group; `state` tracks finished work."""
    from ..generate import bucket_length

    c0 = cells[0]
    try:  # `text` is the haystack itself (run_sweep loads it once)
        episodes = make_episodes(
            c0.task, model.tokenizer, c0.context, trials, c0.seed, text, **options.get(c0.task, {})
        )
    except Exception as e:  # e.g. a text without the facts `qa` needs: every cell of the group fails
        for c in cells:
            state["failed"].add(c.key)
            _write(state["cells_path"], _error(c, e))
        tick(len(cells) * -(-trials // batch_size))
        return
    contexts = [model.tokenizer.encode(e.context) for e in episodes]
    turns = [[model.tokenizer.encode(p) for p in e.pieces()] for e in episodes]
    pols = {c.key: parse_policy(c.policy) for c in cells}
    batches = list(range(0, len(episodes), batch_size))
    for b, start in enumerate(batches):
        todo = [c for c in cells if c.key not in state["failed"] and (c.key, b) not in state["parts"]]
        if not todo:
            continue
        sl = slice(start, start + batch_size)
        eps, ctx, trn = episodes[sl], contexts[sl], turns[sl]
        width = bucket_length(max(len(i) for i in prefill_ids(ctx, trn, c0.mode)))
        captured, pressed = None, {}
        if c0.engine == "kvpress":  # one HF prefill per row serves every press
            from .kvpress_bridge import run_press_sessions

            pressed = run_press_sessions(hf, model.tokenizer, [c.policy for c in todo], ctx, trn, c0.mode)
        for c in todo:
            pol = pols[c.key]
            try:
                if c.engine == "kvpress":
                    res = pressed[c.policy]
                    if isinstance(res, Exception):
                        raise res
                elif pads_safely(pol) or len(eps) == 1:
                    if shares_prefill(pol) and captured is None:
                        captured = capture_batch(model, prefill_ids(ctx, trn, c0.mode))
                    res = run_session(model, pol, ctx, trn, c0.mode, captured=captured)
                else:  # one row at a time: the policy cannot take padded decode steps
                    rows = [run_session(model, pol, [x], [y], c0.mode) for x, y in zip(ctx, trn)]
                    res = SessionResult(
                        [r.outputs[0] for r in rows],
                        *[float(np.mean([getattr(r, f) for r in rows])) for f in ("kv_bytes", "dense_kv_bytes")],
                        *[
                            sum(getattr(r, f) for r in rows)
                            for f in ("capture_s", "compress_s", "append_s", "decode_s")
                        ],
                    )
                part = _part(c, b, eps, res, model, pol, width)
            except Exception as e:  # recorded; the sweep goes on
                state["failed"].add(c.key)
                _write(state["cells_path"], _error(c, e))
                tick(len(batches) - b)
                continue
            state["parts"][(c.key, b)] = part
            _write(state["parts_path"], part)
            tick(1)
            jit_cache.release_if_high()  # a sweep compiles programs per policy and shape
    for c in cells:
        if c.key in state["failed"]:
            continue
        parts = [state["parts"][(c.key, b)] for b in range(len(batches))]
        _write(state["cells_path"], _aggregate(c, parts))


def _run_ppl(model, cells, state, text, tick):
    from .ppl import perplexity_fast, prefix_of

    c0 = cells[0]
    ids = model.tokenizer.encode(load_text(text))
    if len(ids) < c0.context:
        raise ValueError(f"text {text!r} has {len(ids)} tokens, fewer than context={c0.context}")
    start = int(np.random.default_rng(c0.seed).integers(0, len(ids) - c0.context + 1))
    toks = ids[start : start + c0.context]  # the window kvjax.eval.evaluate uses
    captured = None
    for c in cells:
        pol = parse_policy(c.policy)
        try:
            if shares_prefill(pol) and captured is None:
                captured = capture_batch(model, [list(prefix_of(toks)[0])])
            r = perplexity_fast(model, toks, pol, captured=captured)
            r["kv_bytes_held"], r["kv_bytes"] = r["kv_bytes"], _state_bytes(model, pol, 1, c0.context // 2)
            r["compression_ratio"] = r["kv_bytes"] / max(r["dense_kv_bytes"], 1)
            _write(
                state["cells_path"],
                {
                    **dataclasses.asdict(c),
                    "status": "ok",
                    **r,
                    "shared_capture": shares_prefill(pol),
                    "devices": [_device(c.engine)],
                },
            )
        except Exception as e:
            _write(state["cells_path"], _error(c, e))
        tick(1)
        jit_cache.release_if_high()


def check_inputs(model, cells: list[Cell], text: str) -> None:
    """Raise ValueError for an unreadable text or a context the model cannot hold."""
    load_text(text)
    for c in cells:
        if c.context + 64 > model.config.max_position:
            raise ValueError(
                f"context={c.context} exceeds what the model supports (max_position="
                f"{model.config.max_position}, minus 64 tokens for questions and answers)"
            )


def recorded_keys(out: str) -> set[str]:
    """`Cell.key`s of the cells finished in folder `out` (its cells.jsonl) by their tasks'
    current generator versions: the cells a resumed `run_sweep` skips."""
    fields = [f.name for f in dataclasses.fields(Cell)]
    return {Cell(*(r[k] for k in fields)).key for r in read_jsonl(os.path.join(out, "cells.jsonl")) if is_current(r)}


def run_sweep(
    model,
    cells: list[Cell],
    out: str,
    trials=None,
    text: str = "kjv-judges",
    batch_size: int = 5,
    options: dict | None = None,
    progress: bool = True,
    hf=None,
) -> list[dict]:
    """Run every unfinished cell (see module doc); returns all finished cell records.
    trials: int or {task: int} (defaults DEFAULT_TRIALS, else 10); options: {task: kwargs}
    for the episode generators; hf: the transformers model for engine "kvpress" cells."""
    check_inputs(model, cells, text)
    haystack = load_text(text)  # the episodes are woven into this text, not into its name
    os.makedirs(out, exist_ok=True)
    paths = {"cells_path": os.path.join(out, "cells.jsonl"), "parts_path": os.path.join(out, "parts.jsonl")}
    done = recorded_keys(out)
    parts = {(p["key"], p["batch"]): p for p in read_jsonl(paths["parts_path"]) if is_current(p)}
    state = {**paths, "parts": parts, "failed": set()}
    todo = [c for c in cells if c.key not in done]
    groups: dict = {}
    for c in todo:
        groups.setdefault((c.engine, c.context, c.task, c.seed, c.mode), []).append(c)

    def n_trials(task):
        return trials if isinstance(trials, int) else (trials or {}).get(task, DEFAULT_TRIALS.get(task, 10))

    total = sum(len(g) * (1 if k[2] == "ppl" else -(-n_trials(k[2]) // batch_size)) for k, g in groups.items())
    bar = _bar(total, progress)
    for (engine, context, task, seed, mode), group in groups.items():
        bar.set_description(f"{engine} {task} {context} seed={seed} {mode}")
        if task == "ppl":
            _run_ppl(model, group, state, text, bar.update)
        else:
            _run_group(model, group, state, n_trials(task), haystack, batch_size, options or {}, bar.update, hf)
    bar.close()
    keys = {c.key for c in cells}
    return [
        r
        for r in read_jsonl(paths["cells_path"])
        if is_current(r) and Cell(*(r[k] for k in ("engine", "task", "policy", "context", "seed", "mode"))).key in keys
    ]


def enable_compilation_cache(path: str | None = None) -> None:
    """Persist jit compilations across sweep processes (resumed runs recompile nothing)."""
    import jax

    path = path or os.path.join(os.path.expanduser("~"), ".cache", "kvjax", "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="batch", dynamic_ncols=True, smoothing=0.1)


def run_cell(
    model, cell: Cell, trials: int, text: str = "kjv-judges", batch_size: int = 5, options: dict | None = None, hf=None
) -> dict:
    """One cell, nothing kept on disk; raises RuntimeError when the cell fails."""
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        (row,) = run_sweep(
            model,
            [cell],
            out,
            trials={cell.task: trials},
            text=text,
            batch_size=batch_size,
            options=options,
            progress=False,
            hf=hf,
        )
    if row["status"] != "ok":
        raise RuntimeError(f"{cell.task} with {cell.policy} failed: {row['error']}")
    return row
