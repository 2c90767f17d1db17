"""Training Locret's retaining heads on a frozen model, with optax, sized for a CPU.

Data (`collect`): each token sequence [T] runs through the frozen model with a dense
cache. For every layer and each of the first `context` tokens it records the head inputs
(pre-RoPE q, k, v concatenated, `locret.head_inputs`) and the causal importance score
(CIS) label per KV head: the largest scaled attention logit q.k/sqrt(H) the token receives
from the later queries (positions >= context) over the query heads of its KV head. This is
the label of the authors' `data_gen.py`: the max, over the answer's queries and the GQA
group, of the pre-softmax attention scores of the context keys.

Loss and optimiser (the authors' `train.py`): SmoothL1(prediction, CIS) averaged over
layers, heads and tokens, plus 0.0025 * the sum over layers of the mean squared difference
between adjacent tokens' predictions; AdamW (b1 0.9, b2 0.95, weight decay 0.01) at lr 5e-4,
linear warm-up over the first 2/3 of the steps then linear decay to 0, gradients clipped
to [-0.5, 0.5]. One sequence window per step (the authors' batch size 1).

Shipped SmolLM2 heads: `benchmarks/train_locret.py` with its defaults (data, steps, hidden
size in its docstring; the run's loss curve in docs/training/locret_smollm2.json).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import attention
from ..models.forward import forward
from ..state import KVState, LayerContext, SlotKV
from . import slots
from .dense import Dense
from .locret import default_path, head_inputs, head_scores, heads_meta


@dataclasses.dataclass(frozen=True)
class _Probe(Dense):
    """Dense prefill that also returns Locret's training pairs for the first `context`
    tokens: head inputs [B, context, F] and CIS labels [B, N, context]."""

    name = "_locret_probe"
    context: int = 0

    def prefill(self, state, q, k, v, q_pos, ctx):
        sl, _, _ = state
        sl, out = Dense.prefill(self, sl, q, k, v, q_pos, ctx)
        c = self.context
        feats = head_inputs(q[:, :c], k[:, :c], v[:, :c], q_pos[:, :c], ctx.config)
        logits = attention.attention_logits(q[:, c:], slots.to_heads_major(k[:, :c]))  # [B, N, G, Tq, c]
        return (sl, feats, jnp.max(logits, axis=(2, 3))), out


def collect(model, sequences, context: int):
    """Head inputs and CIS labels of token sequences (each [T], T > context).

    Returns (x [S, L, context, F] float16, y [S, L, context, N] float32)."""
    cfg = model.config
    t = len(sequences[0])
    if any(len(s) != t for s in sequences) or not 0 < context < t:
        raise ValueError(
            f"sequences must share one length T > context={context}; got {sorted({len(s) for s in sequences})}"
        )
    probe = _Probe(context=context)
    f_in = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    ctx = LayerContext(0, cfg, "prefill", True, t, 0)

    @jax.jit
    def run(params, toks):
        layers = tuple(
            (
                SlotKV.empty(1, cfg.num_kv_heads, t, cfg.head_dim, jnp.float32),
                jnp.zeros((1, context, f_in)),
                jnp.zeros((1, cfg.num_kv_heads, context)),
            )
            for _ in range(cfg.num_layers)
        )
        state = KVState(layers=layers, lengths=jnp.zeros((1,), jnp.int32))
        pos = jnp.arange(t, dtype=jnp.int32)[None]
        _, st = forward(
            params,
            toks,
            pos,
            state,
            config=cfg,
            policy=probe,
            ctx=ctx,
            dtype=jnp.float32,
            logits_at=jnp.zeros((1,), jnp.int32),
        )
        x = jnp.stack([layer[1][0] for layer in st.layers])  # [L, c, F]
        y = jnp.stack([layer[2][0].T for layer in st.layers])  # [L, c, N]
        return x.astype(jnp.float16), y

    xs, ys = zip(*(run(model.params, jnp.asarray(np.asarray(s, np.int32))[None]) for s in sequences))
    return np.stack([np.asarray(x) for x in xs]), np.stack([np.asarray(y) for y in ys])


def init_heads(config, hidden: int, key) -> dict:
    """Random retaining heads {w1 [L, F, hidden], w2 [L, hidden, N]} (LeCun normal)."""
    f_in = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    k1, k2 = jax.random.split(key)
    w1 = jax.random.normal(k1, (config.num_layers, f_in, hidden)) / np.sqrt(f_in)
    w2 = jax.random.normal(k2, (config.num_layers, hidden, config.num_kv_heads)) / np.sqrt(hidden)
    return {"w1": w1, "w2": w2}


def predict(heads, x) -> jax.Array:
    """All layers' heads on x [L, T, F] -> [L, T, N]."""
    return jax.vmap(head_scores)(heads["w1"], heads["w2"], x.astype(jnp.float32))


def loss_fn(heads, x, y, smooth: float = 0.0025):
    """SmoothL1 + adjacent-token smoothness (module doc). x [L, T, F], y [L, T, N]."""
    p = predict(heads, x)
    main = jnp.mean(optax.huber_loss(p, y.astype(jnp.float32), delta=1.0))
    tv = jnp.sum(jnp.mean((p[:, 1:] - p[:, :-1]) ** 2, axis=(1, 2)))
    return main + smooth * tv, main


def schedule(lr: float, steps: int):
    """Linear warm-up over the first 2/3 of the steps, then linear decay to 0."""
    warm = max(1, (2 * steps) // 3)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warm), optax.linear_schedule(lr, 0.0, max(1, steps - warm))], [warm]
    )


def train(
    config,
    x,
    y,
    *,
    hidden: int = 32,
    steps: int = 600,
    lr: float = 5e-4,
    window: int = 512,
    seed: int = 0,
    log_every: int = 50,
    log=print,
):
    """Fit retaining heads to (x [S, L, C, F], y [S, L, C, N]) from `collect`.

    Each step takes a random window of `window` consecutive tokens of one random sequence.
    Returns (heads {w1, w2} as float32 numpy, history [(step, loss, smoothl1)])."""
    s, _, c, _ = x.shape
    window = min(window, c)
    opt = optax.chain(optax.clip(0.5), optax.adamw(schedule(lr, steps), b1=0.9, b2=0.95, weight_decay=0.01))
    heads = init_heads(config, hidden, jax.random.key(seed))
    opt_state = opt.init(heads)

    @jax.jit
    def step(heads, opt_state, xb, yb):
        (loss, main), g = jax.value_and_grad(loss_fn, has_aux=True)(heads, xb, yb)
        updates, opt_state = opt.update(g, opt_state, heads)
        return optax.apply_updates(heads, updates), opt_state, loss, main

    rng = np.random.default_rng(seed)
    history, t0 = [], time.time()
    for i in range(steps):
        j, o = int(rng.integers(0, s)), int(rng.integers(0, c - window + 1))
        heads, opt_state, loss, main = step(
            heads, opt_state, jnp.asarray(x[j, :, o : o + window]), jnp.asarray(y[j, :, o : o + window])
        )
        if (i + 1) % log_every == 0 or i == 0 or i + 1 == steps:
            history.append((i + 1, float(loss), float(main)))
            log(f"step {i + 1:5d}  loss {float(loss):.4f}  smoothl1 {float(main):.4f}  ({time.time() - t0:.0f}s)")
    return {k: np.asarray(v, np.float32) for k, v in heads.items()}, history


def rank_correlation(heads, x, y) -> np.ndarray:
    """Spearman correlation [S, L, N] between predicted and true CIS of every sequence,
    layer and KV head (x [S, L, C, F], y [S, L, C, N])."""

    def ranks(a):
        return np.argsort(np.argsort(a, axis=-2), axis=-2).astype(np.float64)

    out = []
    for xi, yi in zip(x, y):
        p = np.asarray(predict({k: jnp.asarray(v) for k, v in heads.items()}, jnp.asarray(xi)))
        rp, ry = ranks(p), ranks(yi)
        rp -= rp.mean(-2, keepdims=True)
        ry -= ry.mean(-2, keepdims=True)
        out.append((rp * ry).sum(-2) / np.sqrt((rp**2).sum(-2) * (ry**2).sum(-2)))
    return np.stack(out)


def topk_overlap(heads, x, y, frac: float = 0.1) -> np.ndarray:
    """Share [S, L, N] of the true top-`frac` tokens (by CIS) that are also in the predicted
    top-`frac` (the authors' training "acc")."""
    k = max(1, int(frac * x.shape[2]))
    out = []
    for xi, yi in zip(x, y):
        p = np.asarray(predict({n: jnp.asarray(v) for n, v in heads.items()}, jnp.asarray(xi)))
        tp, ty = np.argsort(-p, axis=-2)[..., :k, :], np.argsort(-yi, axis=-2)[..., :k, :]
        hit = (tp[..., :, None, :] == ty[..., None, :, :]).any(axis=-2)
        out.append(hit.mean(axis=-2))
    return np.stack(out)


def save_heads(path: str, config, heads: dict, info: dict | None = None) -> str:
    """Write heads {w1, w2} (stored as float16) and meta (model facts + `info`) with orbax."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.expanduser(path))
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckpt.save(
        path,
        args=ocp.args.Composite(
            heads=ocp.args.StandardSave({k: np.asarray(v, np.float16) for k, v in heads.items()}),
            meta=ocp.args.JsonSave({**heads_meta(config), **(info or {})}),
        ),
        force=True,
    )
    return path


def text_windows(tokenizer, texts, seq_len: int, per_text: int, held_out: float = 0.1):
    """Token windows for training and a held-out set: each text's first (1 - held_out) of
    tokens gives `per_text` evenly spaced windows of `seq_len`; its last held_out part gives
    one held-out window. Returns (train [list of arrays], held [list of arrays])."""
    train, held = [], []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text), np.int32)
        cut = int(len(ids) * (1 - held_out))
        if cut < seq_len or len(ids) - cut < seq_len:
            raise ValueError(f"a text of {len(ids)} tokens is too short for seq_len={seq_len} windows")
        starts = np.linspace(0, cut - seq_len, per_text).astype(int)
        train += [ids[s : s + seq_len] for s in starts]
        held.append(ids[cut : cut + seq_len])
    return train, held


def train_and_save(
    model,
    sequences,
    out: str | None = None,
    *,
    context: int,
    hidden: int = 32,
    steps: int = 600,
    lr: float = 5e-4,
    window: int = 512,
    seed: int = 0,
    info: dict | None = None,
    log=print,
):
    """collect -> train -> save (default: the shipped location for the model). Returns
    (path, heads, history)."""
    x, y = collect(model, sequences, context)
    heads, history = train(model.config, x, y, hidden=hidden, steps=steps, lr=lr, window=window, seed=seed, log=log)
    meta = {
        "hidden": hidden,
        "steps": steps,
        "lr": lr,
        "window": window,
        "context": context,
        "sequences": len(sequences),
        "seq_len": len(sequences[0]),
        "history": history,
        **(info or {}),
    }
    return save_heads(out or default_path(model.config), model.config, heads, meta), heads, history
