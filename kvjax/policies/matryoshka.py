"""MatryoshkaKV: keys and values projected per KV head onto the first r of H orthonormal directions.

Lin et al., "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal Projection" (ICLR
2025), arXiv:2410.14731.

Per layer and KV head n an orthogonal matrix U_n [H, H] (rows = directions, stored as bases
[N, H, H] with `kvjax.lowrank`'s per-head layout) and a mean mu_n [H]. The cache holds, for each
token, the first r coefficients of its centred key and value,

    c_k = (k - mu_k) U_k[:r]^T [r_k],    c_v = (v - mu_v) U_v[:r]^T [r_v]

and attention runs in the projected space: each query of the group of n is projected by the same
directions, q U_k[:r]^T . c_k = q . (k - mu_k) (projected) differs from q . k by q . mu_k, the same
for every key, so softmax does not see it; the output sum_i p_i c_v,i [r_v] goes back through
U_v[:r] and gets mu_v added (the weights sum to one). Logits keep the model's 1/sqrt(H) scale. At
r = H every step is an orthogonal change of basis: the dense model's logits up to float rounding.
Keys are projected after RoPE, as queries are, so one projection serves every position.

Prefill attends through the projections too (so the projections are trained on exactly what
decoding reads). The directions come from a checkpoint: `kvjax calibrate --method matryoshka` gives
the PCA initialisation (eigenvectors of each head's key / value covariance, strongest first, means =
the calibration means); `kvjax.policies.matryoshka_train` trains them (Cayley parametrisation, the
paper's Matryoshka objective). The SmolLM2 checkpoint in kvjax/policies/data/ holds the PCA
initialisation (its meta records `init: pca`). Trained or not, the
first r rows are the ones kept, so one checkpoint serves every rank.

Traced parameters (`forward(..., policy_params=...)`, `takes_params`): {"k_basis", "v_basis":
[L, N, H, H], "k_mean", "v_mean": [L, N, H]} and optionally "k_mask", "v_mask" [L, N, H] (1 for
the directions a (layer, head) keeps: Matryoshka training samples a rank per head each step).
`schedule`: a JSON file of heterogeneous ranks {"k": [[...] * N] * L, "v": ...} (from
`greedy_ranks`); each layer then stores its largest head's rank and masks the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import attention
from ..quant import calibration
from ..state import LayerContext, SlotKV
from . import slots
from .base import Policy, PolicyError
from .registry import register

METHOD = "matryoshka"
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
NAMES = ("k_basis", "v_basis", "k_mean", "v_mean")


def shipped_path(config) -> str:
    """Where the checkpoint shipped for `config`'s model lives (read only)."""
    return os.path.join(DATA_DIR, f"{METHOD}_{calibration.slug(config.name)}")


def find(config, path: str = "") -> str:
    """`path` if given, else the user cache's (`kvjax calibrate --method matryoshka`), else the
    shipped checkpoint."""
    if path:
        return os.path.abspath(os.path.expanduser(path))
    cached = calibration.cache_path(METHOD, config)
    return cached if os.path.isdir(cached) else shipped_path(config)


def load_params(config, path: str = "") -> dict:
    """{"k_basis", "v_basis": [L, N, H, H], "k_mean", "v_mean": [L, N, H]} float32 numpy for
    `config`'s model. Raises CalibrationError (a PolicyError) when missing, made for another
    model, or not holding H directions per head."""
    where = find(config, path)
    arrays = calibration.load(METHOD, config, where)
    n, h = config.num_kv_heads, config.head_dim
    want = {"k_basis": (n, h, h), "v_basis": (n, h, h), "k_mean": (n, h), "v_mean": (n, h)}
    got = {k: tuple(a.shape[1:]) for k, a in arrays.items()}
    if any(got.get(k) != s for k, s in want.items()):
        raise calibration.CalibrationError(
            f"matryoshka checkpoint at {where} has arrays {got}; expected (after the layer axis) {want}: the "
            f"full H={h} directions per head, so that every rank in [1, {h}] can be served"
        )
    return {k: np.asarray(arrays[k], np.float32) for k in NAMES}


@functools.lru_cache(maxsize=16)
def load_schedule(path: str, layers: int, heads: int, head_dim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Heterogeneous ranks from a JSON file {"k": [L][N], "v": [L][N]} -> (k widths per layer,
    v widths per layer) after checking every rank is in [1, head_dim]."""
    try:
        with open(os.path.expanduser(path)) as f:
            sched = json.load(f)
    except (OSError, ValueError) as e:
        raise PolicyError(f"matryoshka: cannot read the rank schedule {path}: {e}") from e
    for kind in ("k", "v"):
        r = np.asarray(sched.get(kind, []))
        if r.shape != (layers, heads) or r.min() < 1 or r.max() > head_dim:
            raise PolicyError(
                f"matryoshka: schedule {path} needs '{kind}' ranks [{layers}][{heads}] in [1, {head_dim}]; got shape "
                f"{r.shape}" + (f", range [{r.min()}, {r.max()}]" if r.size else "")
            )
    return tuple(map(tuple, np.asarray(sched["k"]))), tuple(map(tuple, np.asarray(sched["v"])))


def project_heads(x: jax.Array, basis: jax.Array, mean: jax.Array | None) -> jax.Array:
    """x [B, T, N, H] (token-major, as the model hands k/v) -> coefficients [B, N, T, r] over
    basis [N, r, H] after subtracting mean [N, H]."""
    xf = x.astype(jnp.float32)
    if mean is not None:
        xf = xf - mean[None, None]
    return jnp.einsum("btnh,nrh->bntr", xf, basis.astype(jnp.float32), precision="highest")


@register
@dataclasses.dataclass(frozen=True)
class Matryoshka(Policy):
    """k_rank / v_rank: directions kept per KV head (1..head_dim); schedule: a JSON file of
    per-(layer, head) ranks instead ("" = k_rank / v_rank everywhere); calibration: checkpoint
    directory ("" = the user cache's, else the one shipped for SmolLM2)."""

    name = "matryoshka"
    k_rank: int = 32
    v_rank: int = 32
    schedule: str = ""
    calibration: str = ""
    takes_params: ClassVar[bool] = True

    def __post_init__(self):
        for key in ("k_rank", "v_rank"):
            r = getattr(self, key)
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise PolicyError(f"matryoshka: {key}={r!r} must be an integer in [1, head_dim]")

    def validate(self, prompt_len, config):
        for key in ("k_rank", "v_rank"):
            if getattr(self, key) > config.head_dim:
                raise PolicyError(
                    f"matryoshka: {key}={getattr(self, key)} exceeds head_dim={config.head_dim} (the directions per head)"
                )
        if self.schedule:
            load_schedule(self.schedule, config.num_layers, config.num_kv_heads, config.head_dim)
        load_params(config, self.calibration)

    def widths(self, layer: int, config) -> tuple[int, int, np.ndarray | None, np.ndarray | None]:
        """(key width, value width, key mask [N, wk] or None, value mask) of a layer."""
        if not self.schedule:
            return self.k_rank, self.v_rank, None, None
        ks, vs = load_schedule(self.schedule, config.num_layers, config.num_kv_heads, config.head_dim)
        out = []
        for ranks in (ks[layer], vs[layer]):
            w = max(ranks)
            out.append((w, (np.arange(w)[None] < np.asarray(ranks)[:, None]).astype(np.float32)))
        return out[0][0], out[1][0], out[0][1], out[1][1]

    def init_layer(self, layer, batch, prompt_len, max_new_tokens, config, dtype):
        wk, wv, _, _ = self.widths(layer, config)
        cap = self.prefill_capacity(prompt_len, max_new_tokens)
        n = config.num_kv_heads
        return SlotKV(
            k=jnp.zeros((batch, n, cap, wk), dtype),
            v=jnp.zeros((batch, n, cap, wv), dtype),
            pos=jnp.full((batch, n, cap), -1, jnp.int32),
            fill=jnp.zeros((), jnp.int32),
        )

    def layer_params(self, params, ctx: LayerContext) -> dict:
        """This layer's bases [N, w, H] (first w rows), means [N, H] and masks [N, w] (or None),
        from traced `params` or the checkpoint."""
        wk, wv, mk, mv = self.widths(ctx.layer, ctx.config)
        src = params if params is not None else load_params(ctx.config, self.calibration)
        i = ctx.layer
        out = {
            "k_basis": jnp.asarray(src["k_basis"][i])[:, :wk],
            "v_basis": jnp.asarray(src["v_basis"][i])[:, :wv],
            "k_mean": jnp.asarray(src["k_mean"][i]),
            "v_mean": jnp.asarray(src["v_mean"][i]),
            "k_mask": None if mk is None else jnp.asarray(mk),
            "v_mask": None if mv is None else jnp.asarray(mv),
        }
        for kind, w in (("k", wk), ("v", wv)):
            if params is not None and f"{kind}_mask" in params:
                traced = jnp.asarray(params[f"{kind}_mask"][i])[:, :w]
                out[f"{kind}_mask"] = traced if out[f"{kind}_mask"] is None else traced * out[f"{kind}_mask"]
        return out

    def _store(self, state, k, v, q_pos, p):
        ck = project_heads(k, p["k_basis"], p["k_mean"])
        cv = project_heads(v, p["v_basis"], p["v_mean"])
        if p["k_mask"] is not None:
            ck = ck * p["k_mask"][None, :, None]
        if p["v_mask"] is not None:
            cv = cv * p["v_mask"][None, :, None]
        return slots.append(state, jnp.swapaxes(ck, 1, 2), jnp.swapaxes(cv, 1, 2), q_pos)

    def _attend(self, state: SlotKV, q, q_pos, p, ctx: LayerContext, prefix_cache: bool):
        nq, h = q.shape[2], q.shape[3]
        n = state.k.shape[1]
        g = nq // n
        kb = jnp.repeat(p["k_basis"], g, axis=0)  # [Nq, wk, H]: a query uses its KV head's directions
        qp = jnp.einsum("btqh,qrh->btqr", q.astype(jnp.float32), kb, precision="highest")
        k, v = state.k, state.v
        wk, wv = k.shape[-1], v.shape[-1]
        if wk != wv:  # the attention kernels take one width: zero columns change no logit / output
            w = max(wk, wv)
            pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, w - x.shape[-1])])
            qp, k, v = pad(qp), pad(k), pad(v)
        res = attention.attend(
            qp.astype(k.dtype),
            k,
            v,
            q_pos,
            state.pos,
            window=ctx.config.sliding_window,
            scale=h**-0.5,
            implementation=ctx.implementation,
            prefix_cache=prefix_cache,
        )
        vb = jnp.repeat(p["v_basis"], g, axis=0)  # [Nq, wv, H]
        out = jnp.einsum("btqr,qrh->btqh", res.out[..., :wv].astype(jnp.float32), vb, precision="highest")
        out = out + jnp.repeat(p["v_mean"], g, axis=0)[None, None]
        return out.astype(q.dtype)

    def prefill(self, state, q, k, v, q_pos, ctx: LayerContext, params=None):
        p = self.layer_params(params, ctx)
        state = self._store(state, k, v, q_pos, p)
        out = self._attend(state, q, q_pos, p, ctx, ctx.prefix_cache)
        if ctx.final:
            state = self.after_prefill(state, q, q_pos, None, ctx)
        return state, out

    def decode(self, state, q, k, v, q_pos, ctx: LayerContext, params=None):
        p = self.layer_params(params, ctx)
        state = self._store(state, k, v, q_pos, p)
        return state, self._attend(state, q, q_pos, p, ctx, False)

    def truncate_layer(self, layer, lengths):
        return slots.truncate_slots(layer, lengths)


# ---- PCA initialisation ------------------------------------------------------------------------
def pca(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer and head: x [L, T, N, H] -> (directions [L, N, H, H], rows = eigenvectors of the
    covariance, largest variance first; means [L, N, H])."""
    xf = np.asarray(x, np.float64)
    mean = xf.mean(axis=1)
    c = xf - mean[:, None]
    cov = np.einsum("ltnh,ltnd->lnhd", c, c) / max(x.shape[1] - 1, 1)
    _, vecs = np.linalg.eigh(cov)  # ascending
    basis = np.swapaxes(vecs[..., ::-1], -1, -2)  # rows, descending
    return basis.astype(np.float32), mean.astype(np.float32)


@calibration.calibrator(METHOD)
def calibrate_pca(stats: dict, config) -> dict:
    """`kvjax calibrate --method matryoshka`: the PCA initialisation from the post-RoPE keys and
    the values of `calibration.collect` statistics (float32)."""
    kb, km = pca(stats["k_post"])
    vb, vm = pca(stats["v"])
    return {"k_basis": kb, "v_basis": vb, "k_mean": km, "v_mean": vm}
