"""Offline calibration for the quantized caches (KVQuant codebooks and thresholds,
RotateKV / block-floating-point / KV4 channel permutations) and A^2ATS's query-aware key
codebooks (`kvjax.policies.a2ats`).

    stats = collect(model, tokens, grads=True)      # per-layer K (pre/post RoPE), V, Fisher
    arrays = CALIBRATORS[method](stats, config)      # numpy arrays, leading axis = layer
    save(path, method, config, arrays)               # orbax: arrays + JSON meta

`calibrate` (`kvjax calibrate --method kvquant --model M --text FILE [--out DIR]`) runs the
three steps after checking the token count against the model's context and a memory
estimate. Where artifacts live, and the order `load` looks in:

1. an explicit path (a policy's `calibration=DIR`, `kvjax calibrate --out DIR`);
2. the user cache, where `kvjax calibrate` writes without `--out`:
   `$XDG_CACHE_HOME/kvjax/calibration/<method>/<model>` (`~/.cache/...` when XDG_CACHE_HOME
   is unset or not absolute);
3. the artifacts shipped for SmolLM2 in `kvjax/quant/data/<method>/<model>` (calibrated on
   the GPL-3 text, so evaluations on other texts do not see their own calibration data).
   Nothing here writes into the installed package.

`load` checks method, model name, layer count, KV heads and head_dim and raises
`CalibrationError` naming both models when a calibration was made for another model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from ..models.forward import forward
from ..policies.base import PolicyError
from ..policies.dense import Dense
from ..state import KVState, LayerContext, SlotKV
from .base import rope_heads

VERSION = 1
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
CALIBRATORS: dict = {}


class CalibrationError(PolicyError):
    """A calibration artifact is missing, unreadable or made for another model/method."""


def calibrator(method: str):
    """Decorator: register fn(stats, config) -> {name: np.ndarray [num_layers, ...]}."""

    def deco(fn):
        CALIBRATORS[method] = fn
        return fn

    return deco


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def default_path(method: str, config) -> str:
    """Where the shipped artifact for `config`'s model would be (read only)."""
    return os.path.join(DATA_DIR, method, slug(config.name))


def user_cache_dir() -> str:
    """kvjax's user cache: $XDG_CACHE_HOME/kvjax (the XDG base directory rule: ignored unless
    absolute), else ~/.cache/kvjax."""
    root = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(root):
        root = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "kvjax")


def cache_path(method: str, config) -> str:
    """Where `kvjax calibrate` without `--out` writes `method`'s artifact for `config`'s model."""
    return os.path.join(user_cache_dir(), "calibration", method, slug(config.name))


def find(method: str, config, path: str | None = None) -> str:
    """The artifact directory `load` reads: `path` if given, else the user cache's if it
    exists, else the shipped one (see the module doc)."""
    if path:
        return os.path.abspath(os.path.expanduser(path))
    cached = cache_path(method, config)
    return cached if os.path.isdir(cached) else default_path(method, config)


#: Methods whose calibrator reads the queries (`collect(..., queries=True)`).
NEEDS_QUERIES = {"a2ats"}


@dataclasses.dataclass(frozen=True)
class _Probe(Dense):
    """Dense prefill that adds zero perturbations dk, dv [B, T, N, H] to the keys and
    values, so jax.grad gives d loss / d K and d loss / d V (KVQuant's Fisher weights), and
    records the post-RoPE queries [B, T, Nq, H]."""

    name = "_probe"

    def prefill(self, state, q, k, v, q_pos, ctx):
        sl, dk, dv, _ = state
        sl, out = Dense.prefill(self, sl, q, k + dk, v + dv, q_pos, ctx)
        return (sl, dk, dv, q.astype(jnp.float32)), out


def collect(model, tokens, grads: bool = False, queries: bool = False) -> dict:
    """Run `tokens` [T] through `model` with a dense cache. Returns numpy float32 arrays
    [L, T, N, H]: k_post (post-RoPE keys), k_pre (pre-RoPE), v; with grads=True also
    gk_pre, gv: gradients of the next-token loss w.r.t. pre-RoPE keys and values; with
    queries=True also q_pre [L, T, Nq, H]: the pre-RoPE queries."""
    cfg = model.config
    toks = jnp.asarray(np.asarray(tokens, np.int32))[None]
    t = toks.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    shape = (1, t, cfg.num_kv_heads, cfg.head_dim)
    empty = SlotKV.empty(1, cfg.num_kv_heads, t, cfg.head_dim, jnp.float32)
    ctx = LayerContext(0, cfg, "prefill", True, t, 0)

    # the weights are an argument, not a closure: closed over, they would be folded into the
    # program as constants (slow to compile, and hundreds of MB in a persistent compilation cache)
    qbuf = jnp.zeros((1, t, cfg.num_heads, cfg.head_dim), jnp.float32)

    def loss(pert, params):
        layers = tuple((empty, dk, dv, qbuf) for dk, dv in pert)
        state = KVState(layers=layers, lengths=jnp.zeros((1,), jnp.int32))
        logits, st = forward(params, toks, pos, state, config=cfg, policy=_Probe(), ctx=ctx, dtype=jnp.float32)
        logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(logp, toks[0, 1:, None], axis=-1))
        return nll, st

    pert = tuple((jnp.zeros(shape), jnp.zeros(shape)) for _ in range(cfg.num_layers))
    if grads:
        (_, st), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(pert, model.params)
    else:
        _, st = jax.jit(loss)(pert, model.params)
    kpost = jnp.stack([layer[0].k[0] for layer in st.layers])  # [L, N, T, H]
    v = jnp.stack([layer[0].v[0] for layer in st.layers])
    hpos = jnp.broadcast_to(jnp.arange(t)[None, None], kpost.shape[:3])
    kpre = rope_heads(kpost, hpos, cfg, inverse=True)
    out = {"k_post": kpost, "k_pre": kpre, "v": v}
    if queries:
        qpost = jnp.stack([jnp.swapaxes(layer[3][0], 0, 1) for layer in st.layers])  # [L, Nq, T, H]
        out["q_pre"] = rope_heads(
            qpost, jnp.broadcast_to(jnp.arange(t)[None, None], qpost.shape[:3]), cfg, inverse=True
        )
    if grads:
        gk = jnp.stack([jnp.swapaxes(dk[0], 0, 1) for dk, _ in g])  # [L, N, T, H] post-RoPE grads
        out["gk_pre"] = rope_heads(gk, hpos, cfg, inverse=True)  # R^T g: gradient w.r.t. pre-RoPE keys
        out["gv"] = jnp.stack([jnp.swapaxes(dv[0], 0, 1) for _, dv in g])
    return {name: np.asarray(jnp.swapaxes(x, 1, 2), np.float32) for name, x in out.items()}


def _meta(method: str, config, extra: dict | None = None) -> dict:
    return {
        "method": method,
        "model": config.name,
        "num_layers": config.num_layers,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "version": VERSION,
        **(extra or {}),
    }


def save(path: str, method: str, config, arrays: dict, extra_meta: dict | None = None) -> str:
    """Write `arrays` ({name: [num_layers, ...]}) and the meta with orbax to `path`."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.path.expanduser(path))
    for name, a in arrays.items():
        if a.shape[0] != config.num_layers:
            raise CalibrationError(f"array {name!r} has shape {a.shape}; expected {config.num_layers} layers first")
    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    ckpt.save(
        path,
        args=ocp.args.Composite(
            arrays=ocp.args.StandardSave({k: np.asarray(v) for k, v in arrays.items()}),
            meta=ocp.args.JsonSave(_meta(method, config, extra_meta)),
        ),
        force=True,
    )
    return path


@functools.lru_cache(maxsize=64)
def _restore(path: str):
    import orbax.checkpoint as ocp

    ckpt = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    try:
        meta = ckpt.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        arrays = ckpt.restore(path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore()))["arrays"]
    except Exception as e:  # orbax raises several types for a missing / foreign directory
        raise CalibrationError(f"cannot read a calibration artifact at {path}: {type(e).__name__}: {e}") from e
    return meta, {k: np.asarray(v) for k, v in arrays.items()}


def load(method: str, config, path: str | None = None) -> dict:
    """The calibration arrays of `method` for `config`'s model, from `find(method, config,
    path)`: `path`, else the user cache, else the shipped artifact. Raises CalibrationError
    when it is missing or was made for another method or model (name, layers, KV heads,
    head_dim all checked)."""
    explicit = bool(path)
    path = find(method, config, path)
    hint = f"run `kvjax calibrate --method {method} --model MODEL` (or pass {method}:calibration=DIR)"
    if not os.path.isdir(path):
        where = path if explicit else f"{cache_path(method, config)} (user cache) or {path} (shipped)"
        raise CalibrationError(f"no {method} calibration for model {config.name!r} at {where}; {hint}")
    meta, arrays = _restore(path)
    if meta.get("method") != method:
        raise CalibrationError(f"calibration at {path} is for method {meta.get('method')!r}, not {method!r}; {hint}")
    want = _meta(method, config)
    keys = ("model", "num_layers", "num_kv_heads", "head_dim")
    if any(meta.get(k) != want[k] for k in keys):
        got = ", ".join(f"{k}={meta.get(k)!r}" for k in keys)
        exp = ", ".join(f"{k}={want[k]!r}" for k in keys)
        raise CalibrationError(
            f"calibration at {path} was made for another model ({got}); this model has {exp}; {hint}"
        )
    for name, a in arrays.items():
        if a.shape[0] != config.num_layers:
            raise CalibrationError(
                f"calibration array {name!r} at {path} has shape {a.shape}; expected {config.num_layers} layers first"
            )
    return arrays


def check_method(method: str) -> None:
    if method not in CALIBRATORS:
        raise ValueError(
            f"method={method!r} needs no calibration or is unknown; calibrated methods: {sorted(CALIBRATORS)}"
        )


def collect_bytes(config, tokens: int, grads: bool, queries: bool = False) -> int:
    """An estimate of the memory `collect` needs beyond the model's weights (float32), counted
    in the buffers XLA keeps: without `grads`, one layer's [heads, T, T] scores and
    probabilities, the logits twice and the K / V statistics (device and host copies); with
    `grads`, four score-sized buffers of every layer (scores, probabilities and their
    gradients, kept for the backward pass), the activations the backward pass keeps (about
    12 hidden + 4 intermediate floats per token and layer), the logits and their gradients,
    and the statistics with their gradients. It errs on the high side of measured peaks."""
    f32, t, layers = 4, tokens, config.num_layers
    score = config.num_heads * t * t * f32  # one layer's [heads, T, T]
    kv = layers * t * config.num_kv_heads * config.head_dim * f32  # one [L, T, N, H] statistic
    logits = t * config.vocab_size * f32
    if queries:  # the queries [L, T, Nq, H], recorded, rotated back and copied to the host
        kv += 4 * config.group_size * kv // 10
    if not grads:
        return 2 * score + 2 * logits + 10 * kv
    acts = layers * t * (12 * config.hidden_size + 4 * config.intermediate_size) * f32
    return 4 * layers * score + acts + 4 * logits + 16 * kv


def available_bytes() -> int | None:
    """Free memory of the default device (accelerators: its limit minus what is in use; the
    CPU: MemAvailable of /proc/meminfo); None where neither is known."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_tokens(method: str, config, tokens: int) -> None:
    """Raise ValueError when `tokens` is not in [2, max_position] or would not fit in memory."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 2:
        raise ValueError(f"tokens={tokens!r} must be an integer >= 2 (the statistics need next-token losses)")
    if tokens > config.max_position:
        raise ValueError(f"tokens={tokens} exceeds the model's context (max_position={config.max_position})")
    need, free = collect_bytes(config, tokens, method == "kvquant", method in NEEDS_QUERIES), available_bytes()
    if free is not None and need > free:
        raise ValueError(
            f"tokens={tokens} needs about {need / 2**30:.1f} GiB for {method} statistics on {config.name} "
            f"but {free / 2**30:.1f} GiB are free; use fewer --tokens"
        )


def _first_tokens(tokenizer, text: str, n: int) -> list[int]:
    """The first `n` tokens of `text`, tokenizing a prefix that grows until it holds them
    with a margin (the last tokens of a cut prefix may differ from the whole text's)."""
    chars = 8 * n + 4096
    while True:
        ids = tokenizer.encode(text[:chars])
        if len(ids) >= n + 64 or chars >= len(text):
            break
        chars *= 2
    if len(ids) < n:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than tokens={n}")
    return ids[:n]


def calibrate(
    method: str, model, text: str, tokens: int = 1024, out: str | None = None, progress: bool = False
) -> tuple[str, dict]:
    """Check `tokens` (`check_tokens`), collect statistics over the first `tokens` tokens of
    `text`, run the method's calibrator and save the artifact to `out` (default:
    `cache_path(method, config)`, where `load` finds it). progress: a bar of the four
    stages on stderr (when it is a terminal). Returns (path, {array: shape})."""
    from tqdm.auto import tqdm

    check_method(method)
    check_tokens(method, model.config, tokens)
    path = out or cache_path(method, model.config)
    bar = tqdm(total=4, disable=None if progress else True, bar_format="{desc}: {n}/{total} stages [{elapsed}]")
    bar.set_description(f"{method}: tokenizing")
    ids = _first_tokens(model.tokenizer, text, tokens)
    bar.update()
    bar.set_description(f"{method}: {tokens}-token forward{' and gradients' if method == 'kvquant' else ''}")
    stats = collect(model, ids, grads=method == "kvquant", queries=method in NEEDS_QUERIES)
    bar.update()
    bar.set_description(f"{method}: fitting")
    arrays = CALIBRATORS[method](stats, model.config)
    bar.update()
    bar.set_description(f"{method}: saving to {path}")
    path = save(path, method, model.config, arrays, {"tokens": tokens})
    _restore.cache_clear()  # a load in this process must read the new artifact
    bar.update()
    bar.close()
    return path, {k: list(v.shape) for k, v in arrays.items()}


# ---- A^2ATS: query-aware key codebooks (kvjax.policies.a2ats) ------------------------------------
#: SmolLM2's windowed-RoPE position (see `a2ats_window`).
A2ATS_WINDOW_SMOLLM2 = 1024


def a2ats_window(config) -> int:
    """The fixed relative position w queries are rotated to (windowed RoPE). The paper uses 2048
    for 128k-context models. SmolLM2 (8k positions) gets 1024: on held-out text its top-3%
    recall with exact pre-RoPE keys changes little with w (0.31 at w = 128 to 0.29 at 2048, at
    2k context; BENCHMARKS.md, Retrieval), and 1024 sits in the range of distances a 4k-8k
    context retrieves over. Models with more than 8192 positions get the paper's 2048."""
    if config.max_position <= 8192:
        return min(A2ATS_WINDOW_SMOLLM2, max(1, config.max_position // 8))
    return 2048


def kmeans(x: np.ndarray, clusters: int, iters: int = 25, seed: int = 0) -> np.ndarray:
    """Lloyd's k-means of many independent problems at once: x [G, T, D] -> centroids [G, C, D]
    (float32), started from C distinct points of each problem (with repeats when T < C); an
    empty cluster keeps its centroid."""
    g, t, _ = x.shape
    rng = np.random.default_rng(seed)
    init = np.stack([rng.choice(t, clusters, replace=t < clusters) for _ in range(g)])
    return np.asarray(_lloyd(jnp.asarray(x, jnp.float32), jnp.asarray(init), clusters, iters))


@functools.partial(jax.jit, static_argnames=("clusters", "iters"))
def _lloyd(x, init, clusters, iters):
    cent = jnp.take_along_axis(x, init[..., None], axis=1)

    def step(cent, _):
        d = jnp.sum(cent * cent, axis=-1)[:, None, :] - 2 * jnp.einsum("gtd,gcd->gtc", x, cent)
        onehot = jax.nn.one_hot(jnp.argmin(d, axis=-1), clusters, dtype=x.dtype)  # [G, T, C]
        count = jnp.sum(onehot, axis=1)[..., None]
        total = jnp.einsum("gtc,gtd->gcd", onehot, x)
        return jnp.where(count > 0, total / jnp.maximum(count, 1), cent), None

    cent, _ = jax.lax.scan(step, cent, None, length=iters)
    return cent


def a2ats_fit(
    stats: dict, config, window: int | None = None, sub_dim: int = 8, bits: int = 6, query_aware: bool = True
) -> dict:
    """A^2ATS codebooks from `collect(..., queries=True)` statistics (He et al., 2025).

    Per layer and KV head: the pre-RoPE queries of the G heads of its group rotated to the fixed
    position w (windowed RoPE: every non-local key is scored as if it were w tokens back), H =
    sum q q^T / count (+ 1e-4 of its mean eigenvalue, so it is positive definite), its Cholesky
    factor L (H = L L^T); then a product-quantization codebook of the pre-RoPE keys in the
    L-transformed space k' = L^T k: the key vector cut into head_dim / sub_dim sub-vectors,
    2**bits centroids each (k-means). ||L^T (k - c)||^2 = (k - c)^T H (k - c) is the expected
    squared error of the query-key logit, so the codebook minimises the attention-score error
    rather than the key error. query_aware=False: L = I (plain k-means, the paper's ablation).

    Returns {"chol": [L, N, H, H], "codebook": [L, N, M, C, sub_dim], "rope_window": [L]}."""
    h = config.head_dim
    if sub_dim < 1 or h % sub_dim:
        raise ValueError(f"sub_dim={sub_dim} must divide head_dim={h}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} must be in [1, 8] (codes are stored as uint8)")
    if "q_pre" not in stats:
        raise ValueError("a2ats needs the queries: collect(model, tokens, queries=True)")
    w = a2ats_window(config) if window is None else window
    n, g, m = config.num_kv_heads, config.group_size, h // sub_dim
    chols, books = [], []
    for q_pre, k_pre in zip(stats["q_pre"], stats["k_pre"]):  # [T, Nq, H], [T, N, H]
        t = q_pre.shape[0]
        if query_aware:
            qh = jnp.swapaxes(jnp.asarray(q_pre), 0, 1)[None]  # [1, Nq, T, H]
            qw = np.asarray(rope_heads(qh, jnp.full(qh.shape[:3], w), config))[0].reshape(n, g * t, h)
            cov = np.einsum("nth,ntd->nhd", qw.astype(np.float64), qw.astype(np.float64)) / (g * t)
            ridge = 1e-4 * np.trace(cov, axis1=1, axis2=2)[:, None, None] / h + 1e-12
            chol = np.linalg.cholesky(cov + ridge * np.eye(h)).astype(np.float32)
        else:
            chol = np.broadcast_to(np.eye(h, dtype=np.float32), (n, h, h)).copy()
        kt = np.einsum("nhd,tnh->ntd", chol, k_pre)  # k' = L^T k, [N, T, H]
        sub = kt.reshape(n, t, m, sub_dim).transpose(0, 2, 1, 3).reshape(n * m, t, sub_dim)
        books.append(kmeans(sub, 2**bits).reshape(n, m, 2**bits, sub_dim))
        chols.append(chol)
    layers = len(chols)
    return {
        "chol": np.stack(chols),
        "codebook": np.stack(books).astype(np.float32),
        "rope_window": np.full((layers,), w, np.int32),
    }


@calibrator("a2ats")
def a2ats(stats: dict, config) -> dict:
    """`kvjax calibrate --method a2ats`: `a2ats_fit` with its defaults (8-dim sub-vectors,
    64 centroids each, w from `a2ats_window`), the factors and codebooks stored in float16 (the
    policy computes in float32 from the stored values, so codes and lookup tables agree)."""
    arrays = a2ats_fit(stats, config)
    return {**arrays, "chol": arrays["chol"].astype(np.float16), "codebook": arrays["codebook"].astype(np.float16)}
