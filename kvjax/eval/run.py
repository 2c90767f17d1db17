"""`evaluate`: one (task, policy, context) cell — accuracy or perplexity plus KV bytes."""

from __future__ import annotations

import numpy as np

from ..generate import generate
from ..policies.registry import parse_policy
from .metrics import perplexity
from .tasks import TASKS, is_correct
from .texts import DEFAULT_TEXT, load_text

SESSION_TASKS = ("prefix_suffix", "qa", "majority", "mix")
TASK_NAMES = ("passkey", "kv_retrieval", "ppl") + SESSION_TASKS


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
) -> dict:
    """Run `trials` samples of `task` at about `context` tokens with `policy` (object or spec).

    Retrieval tasks: needle depths spread evenly over [0.05, 0.95], greedy decoding; returns
    accuracy. "ppl": perplexity over `context` tokens of `text` (see metrics.perplexity).
    Always returns kv_bytes (compressed state after prefill), dense_kv_bytes and
    compression_ratio. The SCBench-style tasks (SESSION_TASKS) and mode="excluded" (the
    question appended after the context is compressed) run through `kvjax.eval.sweep`
    (`policy` must then be a registered spec); `options` go to their episode generator."""
    if task not in TASK_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {TASK_NAMES}")
    pol = parse_policy(policy) if isinstance(policy, str) else policy
    if context + 16 > model.config.max_position:
        raise ValueError(
            f"context={context} exceeds what the model supports (max_position={model.config.max_position})"
        )
    if trials < 1:
        raise ValueError(f"trials={trials} must be >= 1")
    haystack = load_text(text)
    base = {"task": task, "policy": pol.spec(), "context": context, "seed": seed, "text": text}
    if mode not in ("inside", "excluded"):
        raise ValueError(f"mode={mode!r}; expected 'inside' or 'excluded'")
    if task in SESSION_TASKS or (mode != "inside" and task != "ppl"):
        from .sweep import Cell, run_cell

        cell = Cell("kvjax", task, pol.spec(), context, seed, mode)
        row = run_cell(model, cell, trials, text, batch_size, {task: options or {}})
        return {**base, **{k: v for k, v in row.items() if k not in ("engine", "status")}}
    if task == "ppl":
        ids = model.tokenizer.encode(haystack)
        if len(ids) < context:
            raise ValueError(f"text {text!r} has {len(ids)} tokens, fewer than context={context}")
        start = int(np.random.default_rng(seed).integers(0, len(ids) - context + 1))
        return {**base, **perplexity(model, ids[start : start + context], pol, implementation=implementation)}
    make = TASKS[task]
    depths = np.linspace(0.05, 0.95, trials) if trials > 1 else np.array([0.5])
    samples = [make(model.tokenizer, context, float(d), seed * 100003 + i, haystack) for i, d in enumerate(depths)]
    correct, kv_bytes, dense_bytes, outputs = [], [], [], []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        out = generate(model, [s.prompt for s in chunk], policy=pol, max_new_tokens=8, implementation=implementation)
        for s, t in zip(chunk, out.texts):
            correct.append(is_correct(t, s.answer))
            outputs.append({"depth": s.depth, "answer": s.answer, "output": t})
        kv_bytes.append(out.stats["kv_bytes_after_prefill"] / len(chunk))
        dense_bytes.append(out.stats["dense_kv_bytes"] / len(chunk))
    kvb, dnb = float(np.mean(kv_bytes)), float(np.mean(dense_bytes))
    return {
        **base,
        "accuracy": float(np.mean(correct)),
        "trials": len(samples),
        "correct": int(np.sum(correct)),
        "kv_bytes": kvb,
        "dense_kv_bytes": dnb,
        "compression_ratio": kvb / max(dnb, 1.0),
        "samples": outputs,
    }
