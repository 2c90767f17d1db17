"""Why do retrieval / offload policies miss a passkey asked after the context? (CPU diagnostic)

    .venv/bin/python benchmarks/retrieval_diag.py --trial 1 --quest-budgets 512,1024 --shadow-budget 512 --topk 8

One passkey episode of the sweep's `retrieval_4k` grid (SmolLM2, `--context` tokens, trial i of
`--trials`, the sweep's seeds and depths) with the question asked after the context, as
`kvjax.Session.ask` asks it. The context, the question and the gold answer run through the dense
model once, teacher-forced, recording every layer's post-RoPE queries and keys; each decode step
of the turn (every question token, then every answer token) is then replayed against the
selection each policy would make from those exact queries:

* dense: the attention mass each query head puts on the needle's tokens ("The pass key is
  NNNNN. Remember it. NNNNN is the pass key."), per layer: which layers and heads retrieve;
* quest: pages of `page` slots, per-page per-channel key max / min, the page score
  sum_i max(q_i M_i, q_i m_i) (`kvjax.policies.quest.page_scores`), top pages with the current
  page always read, under each GQA mode (`select_pages`: "max", "union") and the paper's own
  per-query-head selection (each query head reads only its own pages): the share of a head's
  dense needle mass that lies in the pages it reads, and the rank of the needle's best page;
* shadowkv: the real policy's prefilled state (SVD of pre-RoPE keys, chunk landmarks,
  outliers), its chunk selection (`ShadowKV.select`) for each query: the needle chunks' best
  rank, whether they are read (selected, outlier or local), and the needle's attention logits
  with the rank-r rebuilt keys against the exact ones;
* offload: the real policy's prefilled state, the blocks the question retrieves
  (`Offload.block_scores`: cosine of each block's mean key with the question's mean query)
  and the needle block's rank, next to per-KV-head and dot-product variants.

The table has one row per layer; "digit steps" are the decode steps whose next token is a
digit of the key (the ones that decide the answer), "all" every step of the turn.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.eval.shared import capture
from kvjax.eval.tasks import make_episodes
from kvjax.eval.texts import load_text
from kvjax.generation.steps import prefill
from kvjax.loaders import load
from kvjax.policies.offload import Offload
from kvjax.policies.quest import page_scores, select_pages
from kvjax.policies.shadowkv import ShadowKV, chunk_scores
from kvjax.quant.base import rope_heads


def needle_span(tok, context: str, key: str) -> tuple[int, int]:
    """Token range [a, b) of the needle line inside the tokenized context."""
    start = context.index(f"The pass key is {key}.")
    end = context.index(f"{key} is the pass key.") + len(f"{key} is the pass key.")
    enc = tok.backend.encode(context, add_special_tokens=False)
    toks = [i for i, (s, e) in enumerate(enc.offsets) if e > start and s < end]
    return toks[0], toks[-1] + 1


def softmax(x, axis=-1):
    m = np.max(x, axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def quest_step(q, k, p, page, budget, needle, probs):
    """Quest at one decode step: q [Nq, H], k [N, T, H] post-RoPE, p the query's position (keys
    0..p visible), needle [a, b), probs [Nq, p+1] dense attention. Returns per mode "max",
    "union", "head": (needle mass read / needle mass [Nq], attention mass read [Nq]) and the
    needle's best page rank per query head [Nq] (1 = top)."""
    n, _, h = k.shape
    nq = q.shape[0]
    g = nq // n
    npages = p // page + 1
    kk = np.full((n, npages * page, h), np.nan, np.float32)
    kk[:, : p + 1] = k[:, : p + 1]
    kp = kk.reshape(n, npages, page, h)
    kmax = np.where(np.isnan(kp), -np.inf, kp).max(axis=2)
    kmin = np.where(np.isnan(kp), np.inf, kp).min(axis=2)
    qg = q.reshape(1, n, g, h)
    scores = np.asarray(page_scores(jnp.asarray(qg), jnp.asarray(kmax[None]), jnp.asarray(kmin[None])))[0]  # [N,G,P]
    cur = p // page
    kpages = min(-(-budget // page), npages)
    limit = jnp.full((1, n), kpages, jnp.int32)
    out = {}
    page_of = np.arange(p + 1) // page
    need = np.zeros(p + 1, bool)
    need[needle[0] : needle[1]] = True
    nmass = (probs * need).sum(-1)  # [Nq]
    for mode in ("max", "union"):
        width = kpages if mode == "max" else min(g * (kpages - 1) + 1, npages)
        pages, valid = select_pages(jnp.asarray(scores[None]), cur, limit, kpages - 1, width, mode)
        pages, valid = np.asarray(pages)[0], np.asarray(valid)[0]
        read = np.zeros((n, npages), bool)
        for j in range(n):
            read[j, pages[j][valid[j]]] = True
        rq = np.repeat(read, g, axis=0)[:, page_of]  # [Nq, p+1]
        out[mode] = ((probs * rq * need).sum(-1) / np.maximum(nmass, 1e-30), (probs * rq).sum(-1))
    # the paper's per-query-head selection: each head its own top K - 1 and the current page
    s = scores.reshape(nq, npages).copy()
    s[:, cur] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, : kpages - 1]
    read = np.zeros((nq, npages), bool)
    read[np.arange(nq)[:, None], top] = True
    read[:, cur] = True
    rq = read[:, page_of]
    out["head"] = ((probs * rq * need).sum(-1) / np.maximum(nmass, 1e-30), (probs * rq).sum(-1))
    npg = np.unique(page_of[needle[0] : needle[1]])
    ranks = np.argsort(np.argsort(-scores.reshape(nq, npages), axis=1, kind="stable"), axis=1) + 1
    return out, ranks[:, npg].min(axis=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=4096, help="episode length in tokens (context + question)")
    ap.add_argument("--trials", type=int, default=20, help="the sweep's trial count (fixes the depths)")
    ap.add_argument("--trial", type=int, default=1, help="which episode (0-based); trial 1 missed for quest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text", default="kjv-judges")
    ap.add_argument("--page", type=int, default=16, help="quest page size")
    ap.add_argument("--quest-budgets", default="512", help="quest token budgets, comma-separated")
    ap.add_argument("--shadow-budget", type=int, default=512, help="shadowkv token budget (0: skip shadowkv)")
    ap.add_argument("--shadow-rank", type=int, default=0, help="shadowkv rank (0: the policy's default)")
    ap.add_argument("--topk", type=int, default=8, help="offload blocks retrieved (0: skip offload)")
    ap.add_argument("--block", type=int, default=64, help="offload block size")
    ap.add_argument("--cache", default="", help="an .npz file keeping the dense pass's queries and keys between runs")
    ap.add_argument("--steps", action="store_true", help="also print every decode step of the 3 most retrieving layers")
    a = ap.parse_args()

    model = load("smollm2", dtype=jnp.float32)
    cfg, tok = model.config, model.tokenizer
    ep = make_episodes("passkey", tok, a.context, a.trials, a.seed, load_text(a.text))[a.trial]
    key = ep.answer
    ctx = tok.encode(ep.context)
    qst = tok.encode(ep.pieces()[0])
    ans = tok.encode(" " + key + ".")
    ids = ctx + qst + ans
    c, t = len(ctx), len(ids)
    needle = needle_span(tok, ep.context, key)
    digit = {tid for d in "0123456789" for tid in tok.encode(d)}
    # decode steps: every question token and every answer token but the last; a step is a
    # "digit step" when the token it predicts is a digit of the key
    steps = list(range(c, t - 1))
    digit_steps = [s for s in steps if ids[s + 1] in digit]
    print(
        f"episode: trial {a.trial} depth {ep.depth:.3f} key {key}; context {c} tokens, question {len(qst)}, "
        f"answer {len(ans)}; needle tokens [{needle[0]}, {needle[1]}) = {tok.decode(ids[needle[0] : needle[1]])!r}"
    )

    nq, n, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = nq // n
    if a.cache and os.path.isfile(a.cache):
        z = np.load(a.cache)
        qs, ks = list(z["q"]), list(z["k"])
    else:
        t0 = time.perf_counter()
        width = -(-t // 64) * 64
        toks = np.full((1, width), cfg.pad_id, np.int32)
        toks[0, :t] = ids
        logits, cap = capture(model, toks, [t])
        jax.block_until_ready(logits)
        print(f"dense teacher-forced pass: {time.perf_counter() - t0:.1f} s")
        qs = [np.asarray(layer.q[0, :t], np.float32) for layer in cap.layers]  # [T, Nq, H]
        ks = [np.asarray(layer.kv.k[0, :, :t], np.float32) for layer in cap.layers]  # [N, T, H]
        del cap
        if a.cache:
            np.savez(a.cache, q=np.stack(qs), k=np.stack(ks))

    # dense teacher-forced greedy check: does the dense model predict each answer token?
    # (logits only at the end here; the digit steps' predictions come from the sweep's dense cell)

    budgets = [int(x) for x in a.quest_budgets.split(",") if x]
    shadow = offload = None
    if a.shadow_budget:
        pol = ShadowKV(budget=a.shadow_budget, rank=a.shadow_rank)
        t0 = time.perf_counter()
        ctoks = jnp.asarray(np.array([ctx + [cfg.pad_id] * (-(-c // 64) * 64 - c)], np.int32))
        _, st = prefill(model.params, ctoks, jnp.asarray([c], jnp.int32), config=cfg, policy=pol, max_new_tokens=64)
        shadow = (pol, st)
        print(
            f"shadowkv prefill (rank {pol.key_rank(cfg)}, budget {a.shadow_budget}): {time.perf_counter() - t0:.1f} s"
        )
    if a.topk:
        pol = Offload(topk=a.topk, block=a.block)
        t0 = time.perf_counter()
        bucket = -(-c // a.block) * a.block
        ctoks = jnp.asarray(np.array([ctx + [cfg.pad_id] * (bucket - c)], np.int32))
        _, st = prefill(model.params, ctoks, jnp.asarray([c], jnp.int32), config=cfg, policy=pol, max_new_tokens=64)
        offload = (pol, st)
        print(f"offload prefill (block {a.block}, topk {a.topk}): {time.perf_counter() - t0:.1f} s")

    rows, detail = [], {}
    for li in range(cfg.num_layers):
        q, k = qs[li], ks[li]
        row = {"layer": li}
        nm_all, nm_dig = [], []
        qstat = {b: {m: [] for m in ("max", "union", "head")} for b in budgets}
        qrank = {b: [] for b in budgets}
        for s in steps:
            logit = np.einsum("ngh,nth->ngt", q[s].reshape(n, g, h), k[:, : s + 1], optimize=True).reshape(nq, -1)
            probs = softmax(logit / math.sqrt(h))
            nmass = probs[:, needle[0] : needle[1]].sum(-1)  # [Nq]
            nm_all.append(nmass)
            if s in digit_steps:
                nm_dig.append(nmass)
                for b in budgets:
                    res, rank = quest_step(q[s], k, s, a.page, b, needle, probs)
                    for m in res:
                        qstat[b][m].append(res[m])
                    qrank[b].append(rank)
        nm_dig = np.array(nm_dig)  # [D, Nq]
        best = int(np.argmax(nm_dig.mean(0)))
        row["needle_mass"] = float(nm_dig.mean(0)[best])
        row["head"] = best
        row["needle_mass_q"] = float(np.array(nm_all)[: len(qst)].max(1).mean())  # question steps, best head
        for b in budgets:
            for m in ("max", "union", "head"):
                cov = np.array([x[0] for x in qstat[b][m]])  # [D, Nq]
                att = np.array([x[1] for x in qstat[b][m]])
                row[f"q{b}_{m}_needle"] = float(cov[:, best].mean())
                row[f"q{b}_{m}_att"] = float(att.mean())
            row[f"q{b}_rank"] = int(np.median(np.array(qrank[b])[:, best]))
        if shadow is not None:
            pol, st = shadow
            ls = st.layers[li]
            nsel, nrank, lerr = [], [], []
            cpos = np.arange(ls.landmarks.shape[2])
            nchunks = np.unique(np.arange(needle[0], needle[1]) // pol.chunk)
            outl = np.asarray(ls.outl.pos[0])  # [N, O*chunk]
            for s in digit_steps:
                qq = jnp.asarray(q[s][None, None])
                ids_, valid = pol.select(ls, qq)
                ids_, valid = np.asarray(ids_)[0], np.asarray(valid)[0]
                sc = np.asarray(chunk_scores(qq[:, 0], ls.landmarks, ls.cand))[0]  # [N, C]
                kvh = best // g
                read = set(ids_[kvh][valid[kvh]].tolist())
                ok = [
                    ch in read or np.isin(np.arange(ch * pol.chunk, (ch + 1) * pol.chunk), outl[kvh]).any()
                    for ch in nchunks
                ]
                nsel.append(np.mean(ok))
                order = np.argsort(-sc[kvh], kind="stable")
                rk = np.empty_like(order)
                rk[order] = np.arange(1, len(order) + 1)
                nrank.append(int(rk[nchunks[nchunks < len(cpos)]].min()) if (nchunks < len(cpos)).any() else -1)
                # the needle's logits with the rank-r rebuilt keys vs the exact keys
                rows_ = jnp.asarray(np.broadcast_to(np.arange(needle[0], needle[1]), (1, n, needle[1] - needle[0])))
                kr = np.asarray(rope_heads(ls.keys.rebuild(rows_), rows_, cfg))[0]  # [N, L, H]
                ke = k[:, needle[0] : needle[1]]
                qh = q[s][best]
                lerr.append(np.abs(kr[kvh] @ qh - ke[kvh] @ qh).max() / math.sqrt(h))
            row["sk_read"] = float(np.mean(nsel))
            row["sk_rank"] = int(np.median(nrank))
            row["sk_logit_err"] = float(np.mean(lerr))
        if offload is not None:
            pol, st = offload
            lo = st.layers[li]
            qmean = q[c : c + len(qst)].reshape(len(qst), n, g, h).mean(axis=2).sum(axis=0)  # as decode: sum of means
            sc = np.asarray(pol.block_scores(lo, jnp.asarray(qmean[None])))[0]  # [P]
            nb = needle[0] // pol.block
            order = np.argsort(-sc, kind="stable")
            row["off_rank"] = int(np.where(order == nb)[0][0]) + 1 if np.isfinite(sc[nb]) else -1
            reps = np.asarray(lo.reps[0])  # [N, P, H]
            okb = np.asarray(lo.ok[0])
            # variants: per KV head cosine (best head's rank), and dot product summed over heads
            cos_h = np.einsum("nph,nh->np", reps, qmean) / (
                np.linalg.norm(reps, axis=-1) * np.linalg.norm(qmean, axis=-1)[:, None] + 1e-8
            )
            cos_h = np.where(okb[None], cos_h, -np.inf)
            rk_h = [int(np.where(np.argsort(-cos_h[j], kind="stable") == nb)[0][0]) + 1 for j in range(n)]
            row["off_rank_head"] = min(rk_h)
            dot = np.where(okb, np.einsum("nph,nh->p", reps, qmean), -np.inf)
            row["off_rank_dot"] = int(np.where(np.argsort(-dot, kind="stable") == nb)[0][0]) + 1
        rows.append(row)
        detail[li] = (np.array(nm_all), qstat, qrank)

    hdr = ["layer", "needle mass (head)", "question"]
    for b in budgets:
        hdr += [f"quest{b} max", "union", "per-head", "att read max/union/head", "rank"]
    if shadow is not None:
        hdr += ["shadow read", "rank", "logit err"]
    if offload is not None:
        hdr += ["offload rank", "per-head", "dot"]
    print()
    print(
        "needle mass: dense attention mass on the needle tokens, mean over the digit steps, of the query head that "
        "retrieves most (its index); question: the same over the question's steps (best head per step).\n"
        "quest B max/union/per-head: share of that head's needle mass inside the pages it reads (digit steps); "
        "att read: mean share of all heads' attention mass read; rank: median rank of the needle's best page for "
        "that head.\nshadow read: share of needle chunks read by that head's KV head (selected or outlier); rank: "
        "median best rank of a needle chunk; logit err: max |q.k_rebuilt - q.k| / sqrt(H) on the needle.\n"
        "offload rank: the needle block's rank for the question's mean query (as the policy scores: cosine, all "
        f"heads concatenated; it retrieves the top {a.topk}); per-head: best rank over KV heads; dot: dot product."
    )
    print(" | ".join(hdr))
    for r in rows:
        if r["layer"] < 2:
            qcells = ["dense"] * (5 * len(budgets))
        else:
            qcells = []
            for b in budgets:
                qcells += [f"{r[f'q{b}_{m}_needle']:.2f}" for m in ("max", "union", "head")]
                qcells += [
                    "/".join(f"{r[f'q{b}_{m}_att']:.2f}" for m in ("max", "union", "head")),
                    str(r[f"q{b}_rank"]),
                ]
        cells = [str(r["layer"]), f"{r['needle_mass']:.3f} (h{r['head']})", f"{r['needle_mass_q']:.3f}"] + qcells
        if shadow is not None:
            cells += [f"{r['sk_read']:.2f}", str(r["sk_rank"]), f"{r['sk_logit_err']:.2f}"]
        if offload is not None:
            cells += [str(r["off_rank"]), str(r["off_rank_head"]), str(r["off_rank_dot"])]
        print(" | ".join(cells))
    if a.steps:
        top = sorted(rows, key=lambda r: -r["needle_mass"])[:3]
        for r in top:
            li = r["layer"]
            nm_all = detail[li][0]
            print(f"\nlayer {li}: needle mass per decode step (max over heads), token -> next")
            for i, s in enumerate(steps):
                print(
                    f"  {s:5d} {tok.decode([ids[s]])!r:>12} -> {tok.decode([ids[s + 1]])!r:<10} {nm_all[i].max():.3f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
