"""`evaluate`: one (task, policy, context) cell, scored exactly as a `kvjax sweep` cell is."""

from __future__ import annotations

from ..policies.base import Policy
from ..policies.registry import parse_policy
from .session import MODES
from .sweep import Cell, run_cell
from .tasks import PPL, TASK_NAMES
from .texts import DEFAULT_TEXT


def evaluate(
    model,
    task: str,
    policy,
    context: int = 4096,
    trials: int = 10,
    seed: int = 0,
    text: str = DEFAULT_TEXT,
    batch_size: int = 4,
    implementation: str | None = None,
    mode: str = "inside",
    options: dict | None = None,
    progress: bool = False,
) -> dict:
    """Score `policy` (a Policy or a spec string) on `trials` episodes of `task`
    (`kvjax.eval.tasks`) of about `context` tokens of `text` (a built-in name or a file).

    The episodes, their seeds (`seed * 100003 + i`) and depths (spread over [0.05, 0.95]), the
    greedy answers and their check are the sweep's (`kvjax.eval.sweep.run_cell`): the same
    cell gives the same numbers here and in `kvjax sweep`. mode "inside": the question is
    prefilled (and compressed) with the context; "excluded": appended after compression.
    "ppl": perplexity over `context` tokens of `text` (`kvjax.eval.ppl`; trials and mode do not
    apply). options: the task generator's options, e.g. {"pairs": 4} for kv_retrieval;
    progress: a bar on stderr. Returns the cell's record: accuracy, correct, questions,
    trials and samples (or ppl), kv_bytes (the state after prefill), kv_bytes_read (what one
    decode step reads of it, `KVState.kv_bytes_read_per_step`), dense_kv_bytes,
    compression_ratio, prefill_s and decode_s per episode. Raises ValueError for bad
    arguments and `CellFailed` when the cell fails (a policy that cannot take the prompt...)."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
    pol = parse_policy(policy) if isinstance(policy, str) else policy
    if not isinstance(pol, Policy):
        raise ValueError(f"policy={policy!r} must be a Policy or a spec string such as 'snapkv:budget=0.2'")
    if task != PPL and mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if isinstance(context, bool) or not isinstance(context, int):
        raise ValueError(f"context={context!r} must be an integer number of tokens")
    cell = Cell("kvjax", task, pol.spec(), context, seed, "-" if task == PPL else mode)
    row = run_cell(
        model,
        cell,
        trials,
        text,
        batch_size,
        {task: options} if options else None,
        implementation=implementation,
        policies={pol.spec(): pol},
        progress=progress,
    )
    drop = ("engine", "status", "settings")
    return {"text": text, **{k: v for k, v in row.items() if k not in drop}}
