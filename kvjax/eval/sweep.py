"""The sweep runner: tasks x policies x budgets x contexts x seeds x modes x engines, resumable.

    cells = plan(["passkey", "ppl"], ["dense", "snapkv"], [0.5, 0.2], [4096], [0])
    rows = run_sweep(model, cells, "out/", trials={"passkey": 20})

Results go to `out/cells.jsonl`, one JSON line per finished cell: status "ok" with accuracy or
ppl, KV bytes, compression ratio and times, or status "error" with the message (a failing
cell never stops the run). Each batch of a cell is first written to `out/parts.jsonl`, so an
interrupted run resumes at the next unfinished batch.

Every record carries its task's version (`tasks.TASKS`) and the `Settings` that shape it
besides its key: the model's fingerprint, the text's name and content hash, the trials, the
task's options and the batch size. Resuming into a folder reuses a recorded cell or batch
only when all of them match. A record of an older task version is redone (the report keeps it
as "TASK-vN"). A record made with other settings, or by a kvjax that did not record them,
stops the run before anything is computed (`SettingsMismatch` names the cell and the
setting); with `force=True` (`kvjax sweep --force`) those records, and the records of failed
cells, are removed and the cells run again. Within one (task, context, seed, mode) group the
dense prefill of each batch is captured once and shared by the policies that `shares_prefill`,
when there are two or more of them (one policy prefills by itself: the same state, faster).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import jit_cache
from ..policies.registry import parse_policy
from .ppl import capture_prefix, perplexity, text_window
from .session import MODES, SessionResult, capture_batch, pads_safely, prefill_ids, run_session
from .shared import shares_prefill
from .tasks import PPL, TASK_NAMES, TASKS, check, check_options, check_text, make_episodes, task_version
from .texts import load_text

ENGINES = ("kvjax", "kvpress")
# Tokens a cell needs beyond its context: the later turns' questions and the answers.
_QUESTION_ROOM = 64


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

    @classmethod
    def of(cls, record: dict) -> Cell:
        """The cell a cells.jsonl record belongs to."""
        return cls(*(record[f.name] for f in dataclasses.fields(cls)))


class SettingsMismatch(ValueError):
    """An output folder holds records of the planned cells made with other settings."""


class CellFailed(RuntimeError):
    """`run_cell`'s cell ended with status "error"."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What shapes a cell's result besides its key; stored in each of its records.
    model: `model_fingerprint`; text: the name or path given; text_sha256: of its content;
    trials, options (sorted (name, value) pairs) and batch_size: None for ppl cells."""

    model: str
    text: str
    text_sha256: str
    trials: int | None = None
    options: tuple = ()
    batch_size: int | None = None

    def as_record(self) -> dict:
        return {**dataclasses.asdict(self), "options": dict(self.options)}

    def differences(self, recorded: dict | None) -> list[str]:
        """'name: recorded X, asked Y' for each setting `recorded` (a record's "settings")
        does not match; one entry when the record has none."""
        if recorded is None:
            return ["settings: not recorded (written by an older kvjax), so they cannot be checked"]
        want = self.as_record()
        return [f"{k}: recorded {recorded.get(k)!r}, asked {v!r}" for k, v in want.items() if recorded.get(k) != v]


@functools.cache
def _leading_values():
    import jax

    return jax.jit(lambda params: [x.reshape(-1)[:64] for x in jax.tree_util.tree_leaves(params)])


def model_fingerprint(model) -> str:
    """'NAME:HASH': the config's name, and a hash of its dimensions, the compute dtype and the
    first 64 values of every parameter array (different weights of one architecture differ)."""
    import jax

    cfg = model.config
    dims = [getattr(cfg, k, None) for k in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads")]
    dims += [getattr(cfg, k, None) for k in ("head_dim", "rope_theta", "rope_scaling", "max_position")]
    h = hashlib.sha256(repr((dims, str(np.dtype(model.dtype)))).encode())
    for a in jax.device_get(_leading_values()(model.params)):
        h.update(np.asarray(a).tobytes())
    return f"{cfg.name}:{h.hexdigest()[:16]}"


def text_sha256(haystack: str) -> str:
    return hashlib.sha256(haystack.encode("utf-8")).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class SweepRun:
    """Everything one `run_sweep` call applies to its cells. trials: an int for every task or
    {task: int} (tasks left out: their `Task.default_trials`); options: {task: {name: value}};
    policies: {spec: Policy} for policy objects a spec cannot rebuild (`evaluate`'s)."""

    model: Any
    text: str
    haystack: str
    model_id: str
    trials: int | Mapping[str, int] | None = None
    batch_size: int = 5
    options: Mapping[str, dict] = dataclasses.field(default_factory=dict)
    hf: Any = None
    implementation: str | None = None
    policies: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def n_trials(self, task: str) -> int:
        if task == PPL:
            return 1
        if isinstance(self.trials, int):
            return self.trials
        return (self.trials or {}).get(task, TASKS[task].default_trials)

    def settings(self, cell: Cell) -> Settings:
        base = Settings(self.model_id, self.text, text_sha256(self.haystack))
        if cell.task == PPL:
            return base
        opts = tuple(sorted((self.options.get(cell.task) or {}).items()))
        return dataclasses.replace(base, trials=self.n_trials(cell.task), options=opts, batch_size=self.batch_size)

    def policy(self, spec: str):
        return self.policies.get(spec) or parse_policy(spec)


@dataclasses.dataclass(frozen=True)
class RunState:
    """The output folder of a run and the work done in it: parts {(cell key, batch): part
    record} that may be reused, and the keys of the cells that failed in this run."""

    out: str
    parts: dict
    failed: set

    @property
    def cells_path(self) -> str:
        return os.path.join(self.out, "cells.jsonl")

    @property
    def parts_path(self) -> str:
        return os.path.join(self.out, "parts.jsonl")

    def write_cell(self, record: dict) -> None:
        _write(self.cells_path, record)

    def write_part(self, part: dict) -> None:
        self.parts[(part["key"], part["batch"])] = part
        _write(self.parts_path, part)

    def fail(self, cell: Cell, settings: Settings, e: Exception) -> None:
        self.failed.add(cell.key)
        self.write_cell(
            {
                **dataclasses.asdict(cell),
                "status": "error",
                "task_version": task_version(cell.task),
                "settings": settings.as_record(),
                "error": f"{type(e).__name__}: {e}",
            }
        )


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
        if t not in TASK_NAMES:
            raise ValueError(f"unknown task {t!r}; expected one of {TASK_NAMES}")
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; expected one of {MODES}")
    for e in engines:
        if e not in ENGINES:
            raise ValueError(f"unknown engine {e!r}; expected one of {ENGINES}")
    for c in contexts:
        if not isinstance(c, int) or c < 1:
            raise ValueError(f"context={c!r} must be a positive number of tokens")
    specs = expand_policies(policies, budgets)
    cells = []
    for e in engines:
        for c in contexts:
            for t in tasks:
                for s in seeds:
                    for m in ("-",) if t == PPL else modes:
                        cells += [Cell(e, t, p, c, s, m) for p in specs]
    return cells


def check_trials(trials) -> None:
    """trials: None, an int >= 1, or {task: int >= 1} naming tasks that have episodes."""
    if trials is None:
        return
    items = trials.items() if isinstance(trials, Mapping) else [("every task", trials)]
    for task, n in items:
        if task == PPL:
            raise ValueError("trials do not apply to ppl (one text window per seed); drop 'ppl=' from the trials")
        if task != "every task" and task not in TASKS:
            raise ValueError(f"trials for unknown task {task!r}; expected tasks from {tuple(TASKS)}")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"trials={n!r} for {task} must be an integer >= 1")


def check_plan(
    cells: list[Cell], trials=None, options=None, haystack: str | None = None, text: str = "the text", batch_size=5
) -> None:
    """Everything about a sweep that can be checked without a model: trials, task options
    (`tasks.check_options`), whether the text states the facts qa and mix ask about, the
    batch size, and a kvpress press for every kvpress cell. Raises ValueError naming the value."""
    check_trials(trials)
    for task, opts in (options or {}).items():
        if task == PPL:
            raise ValueError("ppl takes no options")
        check_options(task, opts)
    if haystack is not None:
        for task in dict.fromkeys(c.task for c in cells):
            check_text(task, haystack, repr(text))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    pressed = list(dict.fromkeys(c.policy for c in cells if c.engine == "kvpress"))
    if pressed:
        from .kvpress_bridge import check_kvpress

        check_kvpress(pressed)


def check_contexts(model, cells: list[Cell], haystack: str | None = None) -> None:
    """Raise ValueError for a context the model cannot hold, or a text shorter than a ppl cell's context."""
    for c in cells:
        if c.context + _QUESTION_ROOM > model.config.max_position:
            raise ValueError(
                f"context={c.context} exceeds what the model supports (max_position="
                f"{model.config.max_position}, minus {_QUESTION_ROOM} tokens for questions and answers)"
            )
    ppl = [c.context for c in cells if c.task == PPL]
    if ppl and haystack is not None:
        n = len(model.tokenizer.encode(haystack))
        if n < max(ppl):
            raise ValueError(f"the text has {n} tokens, fewer than the ppl context={max(ppl)}")


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


def _rewrite(path: str, keep: Callable[[dict], bool]) -> None:
    """Rewrite a JSON-lines file with only the records `keep` accepts (atomically)."""
    records = [r for r in read_jsonl(path) if keep(r)]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def is_current(record: dict) -> bool:
    """Whether a cells / parts record was made by its task's current version."""
    task = record["task"] if "task" in record else record["key"].split("|")[1]
    return task not in TASK_NAMES or record.get("task_version", 1) == task_version(task)


def latest(records: list[dict]) -> dict[str, dict]:
    """{cell key: its last record} over the records of current task versions."""
    return {Cell.of(r).key: r for r in records if is_current(r)}


def summary(records) -> str:
    """The one count of a sweep's cells, printed by `kvjax sweep` and written by `kvjax report`."""
    ok = sum(r.get("status") == "ok" for r in records)
    return f"{ok} cells finished, {len(records) - ok} failed"


def recorded_keys(out: str) -> set[str]:
    """`Cell.key`s of the cells finished in folder `out` (its cells.jsonl) by their tasks'
    current versions, whatever their settings."""
    return set(latest(read_jsonl(os.path.join(out, "cells.jsonl"))))


def _resume(run: SweepRun, cells: list[Cell], out: str, force: bool) -> tuple[RunState, set[str]]:
    """The state a run starts from in `out` (the parts it reuses) and the keys of the recorded
    cells it reuses; see the module doc for the rules."""
    state = RunState(out, {}, set())
    planned = {c.key: c for c in cells}
    mismatched, retried, reused = {}, set(), set()
    for key, r in latest(read_jsonl(state.cells_path)).items():
        if key not in planned:
            continue
        diff = run.settings(planned[key]).differences(r.get("settings"))
        if diff:
            mismatched[key] = diff
        elif r.get("status") != "ok" and force:
            retried.add(key)
        else:
            reused.add(key)
    for p in read_jsonl(state.parts_path):
        key = p["key"]
        if key not in planned or key in reused or not is_current(p):
            continue
        diff = run.settings(planned[key]).differences(p.get("settings"))
        if diff:
            mismatched.setdefault(key, diff)
        else:
            state.parts[(key, p["batch"])] = p
    if mismatched and not force:
        key, diff = next(iter(mismatched.items()))
        raise SettingsMismatch(
            f"{out} holds {len(mismatched)} of this sweep's cells made with other settings "
            f"(first: {key}, {'; '.join(diff)}); pass --force (force=True) to run them again "
            "and replace their records, or choose another output folder"
        )
    drop = set(mismatched) | retried
    if drop:
        _rewrite(state.cells_path, lambda r: not (is_current(r) and Cell.of(r).key in drop))
        # a retried (failed) cell keeps the parts it finished with these settings
        _rewrite(state.parts_path, lambda p: not (is_current(p) and p["key"] in mismatched))
    return state, reused


_BYTES: dict = {}


def _state_bytes(model, policy, batch: int, width: int, read: bool = False) -> int:
    """Bytes of the state right after prefilling a `width`-token bucket (no decode headroom):
    what it holds, or (read=True) what one decode step reads of it."""
    key = (id(model), policy, batch, width)
    if key not in _BYTES:
        _BYTES[key] = _eval_bytes(model, policy, batch, width)
    return _BYTES[key][1 if read else 0]


def _eval_bytes(model, policy, batch, width):
    import jax
    import jax.numpy as jnp

    from ..generation import prefill

    toks = jax.ShapeDtypeStruct((batch, width), jnp.int32)
    lens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    state = jax.eval_shape(
        lambda t, l: prefill(
            model.params, t, l, config=model.config, policy=policy, max_new_tokens=0, dtype=model.dtype
        )[1],
        toks,
        lens,
    )
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.layers)), state.kv_bytes_read_per_step


def _aggregate(cell: Cell, settings: Settings, parts: list[dict]) -> dict:
    parts = sorted(parts, key=lambda p: p["batch"])
    correct = [c for p in parts for c in p["correct"]]  # per episode, per turn
    turns = np.array(correct, dtype=float)
    warm = parts[1:] or parts  # the first batch of a policy includes jit compilation
    episodes = sum(p["episodes"] for p in warm)
    out = {
        **dataclasses.asdict(cell),
        "status": "ok",
        "task_version": task_version(cell.task),
        "settings": settings.as_record(),
        "trials": len(correct),
        "accuracy": float(turns.mean()),
        "turn_accuracy": turns.mean(axis=0).tolist(),
        "correct": int(turns.sum()),
        "questions": int(turns.size),
    }
    for k in ("kv_bytes", "kv_bytes_held", "dense_kv_bytes", "kv_bytes_read"):
        if all(k in p for p in parts):  # kv_bytes_read: parts written before it was recorded lack it
            out[k] = float(np.mean([p[k] for p in parts]))
    out["compression_ratio"] = out["kv_bytes"] / max(out["dense_kv_bytes"], 1.0)
    for k in ("prefill_s", "decode_s"):
        out[k] = float(sum(p[k] for p in warm) / episodes)
    out["shared_capture"] = parts[0]["shared_capture"]
    out["devices"] = sorted({p.get("device", "unrecorded") for p in parts})  # where the batches ran
    out["samples"] = [s for p in parts for s in p["samples"]][:40]
    return out


def _device(engine: str) -> str:
    """What ran the cell: the jax device kind (kvjax) or torch's device (kvpress, CPU torch)."""
    import jax

    return "cpu (torch)" if engine == "kvpress" else jax.devices()[0].device_kind


def _sharing(keys, pols) -> set[str]:
    """The keys whose policies build their prefill state from one shared dense capture: those
    that `shares_prefill`, when there are at least two (a capture costs more than one prefill)."""
    out = {k for k in keys if shares_prefill(pols[k])}
    return out if len(out) >= 2 else set()


def _part(cell, settings, b, episodes, res: SessionResult, model, pol, width, shared: bool) -> dict:
    n = len(episodes)
    correct = [[check(o, t.answer) for o, t in zip(outs, e.turns)] for outs, e in zip(res.outputs, episodes)]
    return {
        "key": cell.key,
        "batch": b,
        "task_version": task_version(cell.task),
        "settings": settings.as_record(),
        "episodes": n,
        "correct": correct,
        "kv_bytes": res.kv_bytes if cell.engine == "kvpress" else _state_bytes(model, pol, n, width) / n,
        "kv_bytes_held": res.kv_bytes,
        **({} if cell.engine == "kvpress" else {"kv_bytes_read": _state_bytes(model, pol, n, width, read=True) / n}),
        "dense_kv_bytes": res.dense_kv_bytes,
        "prefill_s": res.capture_s + res.compress_s,
        "decode_s": res.append_s + res.decode_s,
        "shared_capture": cell.engine == "kvpress" or shared,
        "device": _device(cell.engine),
        "samples": [
            {"depth": e.depth, "answers": [t.answer for t in e.turns], "outputs": o}
            for e, o in zip(episodes, res.outputs)
        ],
    }


def _session_rows(model, pol, ctx, trn, mode, implementation) -> SessionResult:
    """One row at a time, for a policy that cannot take padded decode steps."""
    rows = [run_session(model, pol, [x], [y], mode, implementation=implementation) for x, y in zip(ctx, trn)]
    return SessionResult(
        [r.outputs[0] for r in rows],
        *[float(np.mean([getattr(r, f) for r in rows])) for f in ("kv_bytes", "dense_kv_bytes")],
        *[sum(getattr(r, f) for r in rows) for f in ("capture_s", "compress_s", "append_s", "decode_s")],
    )


def _run_group(run: SweepRun, cells: list[Cell], state: RunState, tick) -> None:
    """Run one (engine, task, context, seed, mode) group of cells."""
    from ..generation import bucket_length

    model, c0 = run.model, cells[0]
    trials, batch_size = run.n_trials(c0.task), run.batch_size
    settings = {c.key: run.settings(c) for c in cells}
    try:
        episodes = make_episodes(
            c0.task, model.tokenizer, c0.context, trials, c0.seed, run.haystack, **run.options.get(c0.task, {})
        )
    except Exception as e:  # e.g. a text window without the facts `qa` needs: every cell of the group fails
        for c in cells:
            state.fail(c, settings[c.key], e)
        tick(len(cells) * -(-trials // batch_size))
        return
    contexts = [model.tokenizer.encode(e.context) for e in episodes]
    turns = [[model.tokenizer.encode(p) for p in e.pieces()] for e in episodes]
    pols = {c.key: run.policy(c.policy) for c in cells}
    batches = list(range(0, len(episodes), batch_size))
    for b, start in enumerate(batches):
        todo = [c for c in cells if c.key not in state.failed and (c.key, b) not in state.parts]
        if not todo:
            continue
        sl = slice(start, start + batch_size)
        eps, ctx, trn = episodes[sl], contexts[sl], turns[sl]
        width = bucket_length(max(len(i) for i in prefill_ids(ctx, trn, c0.mode)))
        captured, pressed = None, {}
        shared = _sharing([c.key for c in todo if pads_safely(pols[c.key]) or len(eps) == 1], pols)
        if c0.engine == "kvpress":  # one HF prefill per row serves every press
            from .kvpress_bridge import run_press_sessions

            pressed = run_press_sessions(run.hf, model.tokenizer, [c.policy for c in todo], ctx, trn, c0.mode)
        for c in todo:
            pol = pols[c.key]
            try:
                if c.engine == "kvpress":
                    res = pressed[c.policy]
                    if isinstance(res, Exception):
                        raise res
                elif pads_safely(pol) or len(eps) == 1:
                    if c.key in shared and captured is None:
                        captured = capture_batch(model, prefill_ids(ctx, trn, c0.mode), run.implementation)
                    res = run_session(
                        model,
                        pol,
                        ctx,
                        trn,
                        c0.mode,
                        captured=captured if c.key in shared else None,
                        implementation=run.implementation,
                    )
                else:
                    res = _session_rows(model, pol, ctx, trn, c0.mode, run.implementation)
                part = _part(c, settings[c.key], b, eps, res, model, pol, width, c.key in shared)
            except Exception as e:  # recorded; the sweep goes on
                state.fail(c, settings[c.key], e)
                tick(len(batches) - b)
                continue
            state.write_part(part)
            tick(1)
            jit_cache.release_if_high()  # a sweep compiles programs per policy and shape
    for c in cells:
        if c.key not in state.failed:
            state.write_cell(_aggregate(c, settings[c.key], [state.parts[(c.key, b)] for b in range(len(batches))]))


def _run_ppl(run: SweepRun, cells: list[Cell], state: RunState, tick) -> None:
    """Run one (engine, context, seed) group of ppl cells on one text window."""
    model, c0 = run.model, cells[0]
    toks = text_window(model.tokenizer, run.haystack, c0.context, c0.seed)
    captured = None
    shared = _sharing([c.key for c in cells if c.engine == "kvjax"], {c.key: run.policy(c.policy) for c in cells})
    for c in cells:
        pol = run.policy(c.policy)
        settings = run.settings(c)
        try:
            if c.key in shared and captured is None:
                captured = capture_prefix(model, toks, implementation=run.implementation)
            cap = captured if c.key in shared else None
            r = perplexity(model, toks, pol, captured=cap, implementation=run.implementation)
            r["kv_bytes_held"], r["kv_bytes"] = r["kv_bytes"], _state_bytes(model, pol, 1, c0.context // 2)
            r["kv_bytes_read"] = _state_bytes(model, pol, 1, c0.context // 2, read=True)
            r["compression_ratio"] = r["kv_bytes"] / max(r["dense_kv_bytes"], 1)
            state.write_cell(
                {
                    **dataclasses.asdict(c),
                    "status": "ok",
                    "task_version": task_version(c.task),
                    "settings": settings.as_record(),
                    **r,
                    "shared_capture": c.key in shared,
                    "devices": [_device(c.engine)],
                }
            )
        except Exception as e:
            state.fail(c, settings, e)
        tick(1)
        jit_cache.release_if_high()


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
    force: bool = False,
    implementation: str | None = None,
    policies: Mapping[str, Any] | None = None,
) -> list[dict]:
    """Run every planned cell not already recorded in `out` with the same settings (see the
    module doc) and return the planned cells' records. trials: an int for every task or
    {task: int} (default `Task.default_trials`); text: a built-in text name or a file;
    options: {task: {option: value}} for the episode generators; progress: a progress bar on
    stderr (when it is a terminal); hf: the transformers model for engine "kvpress" cells;
    force: run again the cells recorded with other settings and the failed ones.
    Raises ValueError (SettingsMismatch for a folder of other settings) before running anything."""
    haystack = load_text(text)  # the episodes are woven into this text, not into its name
    options = {k: dict(v) for k, v in (options or {}).items()}
    check_plan(cells, trials, options, haystack, text, batch_size)
    check_contexts(model, cells, haystack)
    if hf is None and any(c.engine == "kvpress" for c in cells):
        raise ValueError("kvpress cells need hf=kvjax.eval.kvpress_bridge.load_hf(model)")
    run = SweepRun(
        model, text, haystack, model_fingerprint(model), trials, batch_size, options, hf, implementation, policies or {}
    )
    os.makedirs(out, exist_ok=True)
    state, reused = _resume(run, cells, out, force)
    groups: dict = {}
    for c in cells:
        if c.key not in reused:
            groups.setdefault((c.engine, c.context, c.task, c.seed, c.mode), []).append(c)
    total = sum(len(g) * -(-run.n_trials(k[2]) // batch_size) for k, g in groups.items())
    bar = _bar(total, progress)
    for (engine, context, task, seed, mode), group in groups.items():
        bar.set_description(f"{engine} {task} {context} seed={seed} {mode}")
        if task == PPL:
            _run_ppl(run, group, state, bar.update)
        else:
            _run_group(run, group, state, bar.update)
    bar.close()
    recorded = latest(read_jsonl(state.cells_path))
    return [recorded[c.key] for c in cells if c.key in recorded]


def enable_compilation_cache(path: str | None = None) -> None:
    """Persist jit compilations across sweep processes (resumed runs recompile nothing): in
    `path`, else in kvjax's user cache (`quant.calibration.user_cache_dir()`/jax) unless a
    compilation cache is already configured (JAX_COMPILATION_CACHE_DIR, or jax's config)."""
    import jax

    from ..quant.calibration import user_cache_dir

    if path is None and jax.config.jax_compilation_cache_dir:
        return
    path = path or os.path.join(user_cache_dir(), "jax")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    # disable=None: drawn only when stderr is a terminal
    return tqdm(total=total, disable=None if enabled else True, unit="batch", dynamic_ncols=True, smoothing=0.1)


def run_cell(model, cell: Cell, trials: int, text: str = "kjv-judges", batch_size: int = 5, options=None, **kw) -> dict:
    """One cell, nothing kept on disk (keyword arguments as `run_sweep`'s); raises CellFailed
    naming the error when the cell fails."""
    import tempfile

    kw.setdefault("progress", False)
    with tempfile.TemporaryDirectory() as out:
        (row,) = run_sweep(
            model,
            [cell],
            out,
            trials=None if cell.task == PPL else {cell.task: trials},
            text=text,
            batch_size=batch_size,
            options=options,
            **kw,
        )
    if row["status"] != "ok":
        raise CellFailed(f"{cell.task} with {cell.policy} failed: {row['error']}")
    return row
