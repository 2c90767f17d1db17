"""`kvjax report DIR`: markdown tables and PNG plots of a sweep's cells.jsonl.

Tables, one per (context, mode): a row per method and budget, a column per task (accuracy
in percent with the number of questions, or perplexity), KV bytes per episode (held, and read
by one decode step: a fraction of it for the retrieval policies, Quest and A^2ATS), the
measured compression ratio (state bytes / dense bytes) and seconds per episode; kvpress
rows carry the "kvpress" engine label, and a note under a table with kvpress rows names the
kvjax-only methods (quantized caches: kvpress has no quantized-cache press). Plots, one per
(task, context, mode): score against the measured compression ratio, one line per method,
kvpress dashed; a quantized cache's line (dash-dot, triangles) runs through its bit widths,
each point labelled "Nb".
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict

from ..policies.registry import parse_policy
from .sweep import Cell, is_current, latest, read_jsonl, summary


def _parts(spec: str):
    pol = parse_policy(spec)
    return pol.policies if hasattr(pol, "policies") else (pol,)


def is_quantized(spec: str) -> bool:
    """True when a part of `spec` is a quantized cache (a policy with a `bits` parameter)."""
    return any("bits" in type(p).parameters() for p in _parts(spec))


def method_label(spec: str, bits: bool = True) -> tuple[str, float | None]:
    """('snapkv', 0.2) for 'snapkv:budget=0.2,window=64,kernel=5' (defaults dropped,
    other parameters kept: 'snapkv(window=16)'). A quantized cache always shows its bit
    width ('kivi(bits=2)', budget None) unless `bits` is False (the plots' line per method)."""
    labels, budget = [], None
    for p in _parts(spec):
        extra = []
        for k, d in type(p).parameters().items():
            if k == "budget" or (k == "bits" and not bits):
                continue
            if getattr(p, k) != d or k == "bits":
                extra.append(f"{k}={getattr(p, k)}")
        labels.append(p.name + (f"({','.join(extra)})" if extra else ""))
        budget = getattr(p, "budget", None) if budget is None else budget
    return "+".join(labels), budget


def _kvjax_only_note(by: dict) -> str:
    """The note under a table with kvpress rows: its methods without a kvpress row."""
    if not any(engine == "kvpress" for engine, _, _ in by):
        return ""
    pressed = {label for engine, label, _ in by if engine == "kvpress"}
    only = {
        label: spec
        for (engine, label, _), cols in by.items()
        if engine == "kvjax" and label not in pressed
        for spec in [next(iter(cols.values()))["policy"]]
    }
    quant = [spec for spec in only.values() if is_quantized(spec)]
    other = sorted(label for label, spec in only.items() if not is_quantized(spec))
    out = []
    if quant:
        names = sorted({method_label(spec, bits=False)[0] for spec in quant})
        widths = sorted({p.bits for spec in quant for p in _parts(spec) if hasattr(p, "bits")})
        out.append(
            f"Quantized caches ({', '.join(names)}; {' and '.join(map(str, widths))} bits): kvjax only, "
            "kvpress has no counterpart (no quantized-cache press)."
        )
    if other:
        out.append(f"Also kvjax only (no kvpress press): {', '.join(other)}.")
    return " ".join(out)


def _score(r: dict) -> str:
    if r.get("status") != "ok":
        return "error"
    if "ppl" in r:
        return f"{r['ppl']:.2f}"
    return f"{100 * r['accuracy']:.0f} ({r['correct']}/{r['questions']})"


def _rows(cells):
    ok = [r for r in cells if r.get("status") == "ok"]
    return ok, [r for r in cells if r.get("status") != "ok"]


def tables(cells: list[dict]) -> str:
    """The markdown tables (see module doc)."""
    out = []
    groups = defaultdict(list)
    for r in cells:
        groups[(r["context"], r["mode"] if r["task"] != "ppl" else None)].append(r)
    contexts = sorted({c for c, _ in groups})
    for ctx in contexts:
        for mode in ("inside", "excluded"):
            rows = groups.get((ctx, mode), []) + (groups.get((ctx, None), []) if mode == "inside" else [])
            if not rows:
                continue
            tasks = sorted({r["task"] for r in rows}, key=lambda t: (t == "ppl", t))
            by = defaultdict(dict)
            for r in rows:
                label, budget = method_label(r["policy"])
                by[(r["engine"], label, budget)][r["task"]] = r
            what = (
                "question inside the compressed context"
                if mode == "inside"
                else "question excluded (appended after compression)"
            )
            out.append(f"### {ctx} tokens, {what}\n")
            out.append(
                "| engine | method | budget | "
                + " | ".join(tasks)
                + " | KV bytes | read/step | ratio | prefill s | decode s |"
            )
            out.append("|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|---|")
            for (engine, label, budget), cols in sorted(
                by.items(), key=lambda kv: (kv[0][1] != "dense", kv[0][1], -(kv[0][2] or 1.0), kv[0][0])
            ):
                ref = next(
                    (cols[t] for t in tasks if t != "ppl" and cols.get(t, {}).get("status") == "ok"),
                    next(iter(cols.values())),
                )
                cells_md = " | ".join(_score(cols[t]) if t in cols else "-" for t in tasks)
                kv = f"{ref['kv_bytes'] / 1e6:.1f} MB" if "kv_bytes" in ref else "-"
                read = f"{ref['kv_bytes_read'] / 1e6:.1f} MB" if "kv_bytes_read" in ref else "-"
                ratio = f"{ref['compression_ratio']:.3f}" if "compression_ratio" in ref else "-"
                times = " | ".join(f"{ref[k]:.1f}" if k in ref else "-" for k in ("prefill_s", "decode_s"))
                b = "-" if budget is None else f"{budget:g}"
                out.append(f"| {engine} | {label} | {b} | {cells_md} | {kv} | {read} | {ratio} | {times} |")
            note = _kvjax_only_note(by)
            out.append(f"\n{note}\n" if note else "")
    return "\n".join(out)


def plot_lines(rows: list[dict], task: str) -> dict:
    """{(label, engine, quantized): [(ratio, score, bits or None), ...]} for one plot: a line
    per method over its budgets; a quantized cache without a budget: one line through its
    bit widths (label without bits, each point carrying its width)."""
    lines = defaultdict(list)
    for r in rows:
        quant = is_quantized(r["policy"]) and method_label(r["policy"])[1] is None
        label, _ = method_label(r["policy"], bits=not quant)
        y = r["ppl"] if task == "ppl" else 100 * r["accuracy"]
        bits = next((p.bits for p in _parts(r["policy"]) if hasattr(p, "bits")), None) if quant else None
        lines[(label, r["engine"], quant)].append((r["compression_ratio"], y, bits))
    return dict(lines)


def plots(cells: list[dict], out_dir: str) -> list[str]:
    """One PNG per (task, context, mode); returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok, _ = _rows(cells)
    groups = defaultdict(list)
    for r in ok:
        groups[(r["task"], r["context"], r["mode"])].append(r)
    names = []
    for (task, ctx, mode), rows in sorted(groups.items()):
        lines = plot_lines(rows, task)
        crowded = len(lines) > 12  # legend beside the axes, not over the points
        fig, ax = plt.subplots(figsize=(11, 5) if crowded else (7, 4.5))
        n_labels = len({label for label, _, _ in lines})
        cmap = plt.get_cmap("tab20") if n_labels > 10 else None
        colors = {}
        for (label, engine, quant), pts in sorted(lines.items()):
            pts.sort()
            color = colors.setdefault(label, cmap(len(colors) % 20) if cmap else f"C{len(colors) % 10}")
            style = "--" if engine == "kvpress" else ("-." if quant else "-")
            marker = "s" if engine == "kvpress" else ("^" if quant else "o")
            ax.plot(
                [p[0] for p in pts], [p[1] for p in pts], style, marker=marker, color=color, label=f"{label} ({engine})"
            )
            for x, y, b in pts:
                if b is not None:
                    ax.annotate(f"{b}b", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=color)
        ax.set_xlabel("KV bytes / dense KV bytes (measured)")
        ax.set_ylabel("perplexity" if task == "ppl" else "accuracy (%)")
        if task == "ppl":
            ax.set_yscale("log")
        where = "question inside" if mode == "inside" else ("question excluded" if mode == "excluded" else "")
        ax.set_title(f"{task}, {ctx} tokens {('(' + where + ')') if where else ''}")
        ax.grid(alpha=0.3)
        if crowded:
            ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        else:
            ax.legend(fontsize=7, ncol=2, loc="best")
        fig.tight_layout()
        name = f"{task}_{ctx}_{mode.strip('-') or 'na'}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        names.append(name)
    return names


def _label_versions(cells: list[dict]) -> tuple[list[dict], set]:
    """The last record of each cell of the current task version, and the cells of an older
    version that were not redone, with the task label "TASK-vN" (their own column and plots);
    returns (cells, those labels)."""
    current = latest(cells)
    out, stale, old = list(current.values()), set(), {}
    for r in cells:
        if not is_current(r) and Cell.of(r).key not in current:
            old[(Cell.of(r).key, r.get("task_version", 1))] = r
    for r in old.values():
        r = {**r, "task": f"{r['task']}-v{r.get('task_version', 1)}"}
        stale.add(r["task"])
        out.append(r)
    return out, stale


def write_report(directory: str, out: str | None = None) -> str:
    """Write report.md (+ PNG plots) for `directory`'s cells.jsonl into `out` (default:
    the same directory); returns the markdown path. ValueError when there is nothing to report."""
    path = os.path.join(directory, "cells.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} holds no cells.jsonl; run `kvjax sweep --out {directory}` first")
    cells = read_jsonl(path)
    if not cells:
        raise ValueError(f"{path} holds no finished cells yet")
    cells, stale = _label_versions(cells)
    out = out or directory
    os.makedirs(out, exist_ok=True)
    names = plots(cells, out)
    ok, bad = _rows(cells)
    ran = Counter(d for r in ok for d in r.get("devices", ["not recorded"]))
    where = ", ".join(f"{d}: {n}" for d, n in sorted(ran.items()))
    md = [
        f"# Quality sweep: {os.path.relpath(directory)}\n",
        f"{summary(cells)}. Cells by device ({where}); prefill / decode seconds "
        "are only comparable between cells of one device.\n",
    ]
    unchecked = sum("settings" not in r for r in cells)
    if unchecked:
        md.append(
            f"{unchecked} cells were recorded without their settings (model, text, trials, options, batch "
            "size) by an older kvjax: those cannot be checked, and a resumed sweep does not reuse them.\n"
        )
    if stale:
        md.append(
            f"Columns {', '.join(sorted(stale))} come from an older version of that task's episodes "
            "(`kvjax.eval.tasks.TASKS`); rerunning the sweep into this folder redoes them.\n"
        )
    md.append(tables(cells))
    if bad:
        md.append("### Failed cells\n")
        md += [
            f"* {r['engine']} {r['task']} {r['policy']} {r['context']} {r['mode']}: {r.get('error', '?')}" for r in bad
        ]
        md.append("")
    md.append("### Plots\n")
    md += [f"![{n}]({n})" for n in names]
    target = os.path.join(out, "report.md")
    with open(target, "w") as f:
        f.write("\n".join(md) + "\n")
    return target
