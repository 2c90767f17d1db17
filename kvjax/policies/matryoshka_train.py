"""Matryoshka training of MatryoshkaKV's projections with optax, and the greedy rank search.

Lin et al. (ICLR 2025), arXiv:2410.14731. The base model is frozen; the trainable parameters are,
per layer and KV head, an unconstrained matrix A [H, H] for keys and one for values and the key
and value means [H]. The directions are U = cayley(A) U_0 with cayley(A) = (I + S)^-1 (I - S),
S = A - A^T (skew-symmetric, so cayley(A) is orthogonal and U keeps orthonormal rows); A = 0 at
the start gives U_0, the PCA initialisation (`kvjax.policies.matryoshka.pca`).

Each step samples one key rank and one value rank per (layer, head) from `ranks` (the Matryoshka
schedule: every prefix of the directions must serve, so every rank is trained), masks the
directions beyond them (`policy_params` "k_mask" / "v_mask"), runs the frozen model through the
projected cache (`forward(..., policy_params=...)`, gradients reach A and the means only) and
minimises KL(teacher || student) + next-token cross-entropy, the teacher being the same weights
with the dense cache.

`greedy_ranks` gives heterogeneous ranks per (layer, head) under a budget on the directions kept:
starting from H everywhere it repeatedly drops `step` directions where that loses the least of
the head's coefficient energy (the fraction of the head's variance the dropped directions held
on calibration tokens), a cheap proxy the paper's search replaces with the model's loss.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..models.forward import forward
from ..quant import calibration
from ..state import KVState, LayerContext
from . import matryoshka
from .dense import Dense

DEFAULT_RANKS = (8, 16, 24, 32, 40, 48, 56, 64)


def _inverse_unpivoted(m: jax.Array) -> jax.Array:
    """m^-1 for [..., H, H] matrices whose symmetric part is positive definite (I + S, S skew),
    by Gauss-Jordan elimination without pivoting, which is stable for them (their LU factors
    exist with bounded growth). Pure XLA, so no LAPACK call: XLA:CPU's LAPACK custom call inside
    the training step's program deadlocked (the step never completed, every thread idle)."""
    h = m.shape[-1]
    rows = jnp.arange(h)

    def eliminate(i, ab):
        a, b = ab
        row_a = jax.lax.dynamic_index_in_dim(a, i, axis=-2, keepdims=False)  # [..., H]
        row_b = jax.lax.dynamic_index_in_dim(b, i, axis=-2, keepdims=False)
        piv = jax.lax.dynamic_index_in_dim(row_a, i, axis=-1, keepdims=True)  # [..., 1]
        row_a, row_b = row_a / piv, row_b / piv
        col = jax.lax.dynamic_index_in_dim(a, i, axis=-1, keepdims=False)  # [..., H]: column i
        col = jnp.where(rows == i, 0.0, col)[..., None]
        a = jnp.where((rows == i)[:, None], row_a[..., None, :], a - col * row_a[..., None, :])
        b = jnp.where((rows == i)[:, None], row_b[..., None, :], b - col * row_b[..., None, :])
        return a, b

    eye = jnp.broadcast_to(jnp.eye(h, dtype=m.dtype), m.shape)
    return jax.lax.fori_loop(0, h, eliminate, (m, eye))[1]


@jax.custom_vjp
def _cayley_skew(s: jax.Array) -> jax.Array:
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    return 2.0 * _inverse_unpivoted(eye + s) - eye


def _cayley_fwd(s):
    eye = jnp.eye(s.shape[-1], dtype=s.dtype)
    inv = _inverse_unpivoted(eye + s)
    return 2.0 * inv - eye, inv


def _cayley_bwd(inv, g):
    # Q = 2 M^-1 - I with M = I + S: dQ = -2 M^-1 dS M^-1, so dL/dS = -2 M^-T G M^-T
    inv_t = jnp.swapaxes(inv, -1, -2)
    return (-2.0 * inv_t @ g @ inv_t,)


_cayley_skew.defvjp(_cayley_fwd, _cayley_bwd)


def cayley(a: jax.Array) -> jax.Array:
    """Orthogonal [..., H, H] from an unconstrained a: (I + S)^-1 (I - S) = 2 (I + S)^-1 - I,
    S = a - a^T; the inverse by `_inverse_unpivoted`, the gradient in closed form."""
    return _cayley_skew(a - jnp.swapaxes(a, -1, -2))


def init_train(init: dict) -> dict:
    """Trainable parameters from a PCA (or earlier) checkpoint: zero skews, its means."""
    return {
        "k_skew": jnp.zeros_like(jnp.asarray(init["k_basis"])),
        "v_skew": jnp.zeros_like(jnp.asarray(init["v_basis"])),
        "k_mean": jnp.asarray(init["k_mean"]),
        "v_mean": jnp.asarray(init["v_mean"]),
    }


def bases(train: dict, init: dict) -> dict:
    """The policy parameters the trainable ones stand for: {k/v_basis [L, N, H, H], k/v_mean}."""
    return {
        "k_basis": cayley(train["k_skew"]) @ jnp.asarray(init["k_basis"]),
        "v_basis": cayley(train["v_skew"]) @ jnp.asarray(init["v_basis"]),
        "k_mean": train["k_mean"],
        "v_mean": train["v_mean"],
    }


def sample_masks(key, config, ranks=DEFAULT_RANKS) -> dict:
    """One key and one value rank per (layer, head), uniform over `ranks`: masks [L, N, H]."""
    shape = (config.num_layers, config.num_kv_heads)
    kk, kv = jax.random.split(key)
    choices = jnp.asarray(ranks, jnp.int32)
    out = {}
    for name, k in (("k_mask", kk), ("v_mask", kv)):
        r = jax.random.choice(k, choices, shape)
        out[name] = (jnp.arange(config.head_dim)[None, None] < r[..., None]).astype(jnp.float32)
    return out


def _logits(model_params, config, tokens, policy, policy_params=None):
    b, t = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    layers = tuple(policy.init_layer(i, b, t, 0, config, jnp.float32) for i in range(config.num_layers))
    state = KVState(layers=layers, lengths=jnp.zeros((b,), jnp.int32))
    ctx = LayerContext(0, config, "prefill", True, t, 0)
    logits, _ = forward(
        model_params, tokens, pos, state, config=config, policy=policy, ctx=ctx, policy_params=policy_params
    )
    return logits


def loss_fn(train, init, masks, model_params, config, tokens, teacher_logp, kl_weight: float = 1.0):
    """KL(teacher || student) (mean over positions) * kl_weight + next-token CE; returns (loss,
    (kl, ce))."""
    h = config.head_dim
    student = matryoshka.Matryoshka(k_rank=h, v_rank=h)
    pp = {**bases(train, init), **masks}
    logp = jax.nn.log_softmax(_logits(model_params, config, tokens, student, pp), axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - logp), axis=-1))
    ce = -jnp.mean(jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1))
    return kl_weight * kl + ce, (kl, ce)


def train(
    model,
    token_batches,
    init: dict,
    *,
    steps: int,
    lr: float = 1e-3,
    ranks=DEFAULT_RANKS,
    seed: int = 0,
    log=print,
    time_limit: float | None = None,
) -> tuple[dict, list[dict]]:
    """Matryoshka training (module doc) over `token_batches` (a list of [B, T] int arrays, cycled)
    for `steps` steps, or fewer when `time_limit` seconds have passed. Returns (the trained policy
    parameters as numpy {k/v_basis, k/v_mean}, the log rows)."""
    cfg = model.config
    init = {k: jnp.asarray(v) for k, v in init.items()}
    params = init_train(init)
    opt = optax.adam(lr)
    opt_state = opt.init(params)

    teacher = jax.jit(lambda p, t: jax.nn.log_softmax(_logits(p, cfg, t, Dense()), axis=-1))

    @jax.jit
    def step(params, opt_state, key, model_params, tokens, teacher_logp):
        masks = sample_masks(key, cfg, ranks)
        (loss, (kl, ce)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            params, init, masks, model_params, cfg, tokens, teacher_logp
        )
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, kl, ce

    rows, key, t0, compiled = [], jax.random.key(seed), time.time(), None
    for i in range(steps):
        tokens = jnp.asarray(token_batches[i % len(token_batches)], jnp.int32)
        key, sub = jax.random.split(key)
        # one program at a time: the teacher's logits are ready before the step starts
        teacher_logp = jax.block_until_ready(teacher(model.params, tokens))
        args = (params, opt_state, sub, model.params, tokens, teacher_logp)
        if compiled is None:  # one program: later steps' arguments are placed as its inputs were
            compiled = step.lower(*args).compile()
        args = jax.device_put(args, compiled.input_shardings[0])
        params, opt_state, loss, kl, ce = jax.block_until_ready(compiled(*args))
        row = {
            "step": i + 1,
            "loss": float(loss),
            "kl": float(kl),
            "ce": float(ce),
            "wall_s": round(time.time() - t0, 2),
        }
        rows.append(row)
        log(json.dumps(row))
        if time_limit is not None and time.time() - t0 > time_limit:
            break
    out = jax.tree.map(np.asarray, bases(params, init))
    return {k: np.asarray(v, np.float32) for k, v in out.items()}, rows


def save(path: str, config, arrays: dict, meta: dict) -> str:
    """Write a Matryoshka checkpoint (the format `matryoshka.load_params` reads)."""
    out = calibration.save(path, matryoshka.METHOD, config, arrays, meta)
    calibration._restore.cache_clear()
    return out


# ---- heterogeneous ranks ------------------------------------------------------------------------
def coefficient_energy(stats: dict, arrays: dict) -> dict:
    """Per (layer, head) the share of the centred keys' (values') energy each direction holds on
    calibration tokens (`calibration.collect` statistics [L, T, N, H]): {"k", "v": [L, N, H]}."""
    out = {}
    for kind, x in (("k", stats["k_post"]), ("v", stats["v"])):
        c = np.asarray(x, np.float64) - arrays[f"{kind}_mean"][:, None].astype(np.float64)
        coef = np.einsum("ltnh,lnrh->lnrt", c, arrays[f"{kind}_basis"].astype(np.float64))
        e = np.sum(coef**2, axis=-1)
        out[kind] = e / np.maximum(e.sum(axis=-1, keepdims=True), 1e-30)
    return out


def greedy_ranks(energy: dict, budget: float, step: int = 8, minimum: int = 8) -> dict:
    """Ranks {"k", "v": [L][N]} keeping at most `budget` (a fraction in (0, 1]) of all directions:
    from H everywhere, drop `step` directions at a time where the energy lost (`energy` [L, N, H]
    per kind, `coefficient_energy`) is least, never below `minimum`."""
    if not 0 < budget <= 1:
        raise ValueError(f"budget={budget!r} must be a fraction of the directions in (0, 1]")
    ranks = {k: np.full(e.shape[:2], e.shape[2], np.int64) for k, e in energy.items()}
    h = next(iter(energy.values())).shape[2]
    total = sum(r.size for r in ranks.values()) * h
    while sum(int(r.sum()) for r in ranks.values()) > budget * total:
        best = None
        for kind, e in energy.items():
            r = ranks[kind]
            for (layer, head), cur in np.ndenumerate(r):
                if cur - step < minimum:
                    continue
                cost = float(e[layer, head, cur - step : cur].sum())
                if best is None or cost < best[0]:
                    best = (cost, kind, layer, head)
        if best is None:
            break
        ranks[best[1]][best[2], best[3]] -= step
    return {k: r.tolist() for k, r in ranks.items()}
