"""CSKV: low-rank channel shrinking of the keys and values, with an exact window of recent tokens.

Wang et al., "CSKV: Training-Efficient Channel Shrinking for KV Cache in Long-Context
Scenarios" (2024), arXiv:2409.10593.

Each layer's pre-RoPE keys K [T, N*H] (all KV heads of a token, head-major) and values V are
stored as coefficients over calibrated bases shared by every row (`kvjax.lowrank`, joint over
heads, as the paper factors the whole key / value projection):

    coefficients   c_k = K_pre B_k^T [T, r_k],   c_v = V B_v^T [T, r_v]     (B rows orthonormal)
    rebuilt        K = RoPE(c_k B_k, pos),       V = c_v B_v

r = N * round(density * H) (a multiple of N, so a token's coefficients are held as N pieces of
r / N in the cache's per-head layout). The bases come from `kvjax calibrate --method cskv`: the
closed-form optimum of the reconstruction objective min ||K - K A B|| over rank-r factors (the
top right singular vectors of the stacked calibration keys / values: reduced-rank regression,
Eckart-Young), or the paper's ASVD initialisation (`variant="asvd"`: right singular vectors of
the activation-scaled projection weight diag(mean|x|^0.5) W_k, Yuan et al. 2023), which the
closed form never loses to on the calibration tokens.

The newest tokens stay exact: the quantized-cache engine (`kvjax.quant.base.QuantPolicy`)
prefills on a full-precision cache, keeps `window` (R) recent tokens in a full-precision window
and converts its `group` (T) oldest tokens to coefficients when it holds R + T, as KIVI flushes
its residual window. `bits` > 0 quantizes the coefficients as KIVI quantizes keys and values
(key coefficients per channel over groups of T tokens, value coefficients per token over each
head's piece), which is what ``cskv:...+kivi:bits=4`` builds (`absorb`: KIVI's bits and group,
CSKV's window). The state's bytes count the stored coefficients (or codes and scales), their
positions and the window; the bases are model constants outside the state.

Because a token's coefficients mix all heads, CSKV stores whole tokens: it cannot ingest another
policy's per-head selection (``snapkv+cskv`` is refused).
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from .. import lowrank
from ..pallas_kernels import packing
from ..quant import affine, calibration
from ..quant.base import QuantPolicy, rope_heads
from ..state import LayerContext
from .base import PolicyError
from .registry import register

METHOD = "cskv"
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")
VARIANTS = ("svd", "asvd")
COEF_BITS = (0, 2, 4, 8)


def shipped_path(config) -> str:
    """Where the calibration shipped for `config`'s model lives (read only)."""
    return os.path.join(DATA_DIR, f"{METHOD}_{calibration.slug(config.name)}")


def find(config, path: str = "") -> str:
    """The artifact `load_bases` reads: `path` if given, else the user cache's
    (`kvjax calibrate --method cskv` without --out), else the shipped one."""
    if path:
        return path
    cached = calibration.cache_path(METHOD, config)
    return cached if os.path.isdir(cached) else shipped_path(config)


_ORTHO: dict = {}


def _orthonormal(stored: np.ndarray) -> np.ndarray:
    """`orthonormal_rows` of every layer of a loaded array [L, D, D], computed once per array
    (`calibration.load` returns the same cached arrays until an artifact is rewritten)."""
    hit = _ORTHO.get(id(stored))
    if hit is None or hit[0] is not stored:
        hit = _ORTHO[id(stored)] = (stored, np.stack([orthonormal_rows(b) for b in stored]))
    return hit[1]


def orthonormal_rows(basis: np.ndarray) -> np.ndarray:
    """Rows of basis [r, D] made exactly orthonormal in float64 (Gram-Schmidt via QR, signs
    kept): bases are shipped in float16, and a rank-D basis must rebuild keys exactly."""
    q, r = np.linalg.qr(np.asarray(basis, np.float64).T)
    q = q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))[None, :]
    return q.T.astype(np.float32)


def load_bases(config, path: str = "") -> dict:
    """{"k_basis", "v_basis": [L, N*H, N*H] float32, rows orthonormal, strongest first} for
    `config`'s model. Raises CalibrationError (a PolicyError) when missing or made for another
    model (name, layers, KV heads, head_dim checked by `kvjax.quant.calibration.load`)."""
    where = os.path.abspath(os.path.expanduser(find(config, path)))
    arrays = calibration.load(METHOD, config, where)  # checks the model; raises with a hint
    d = config.num_kv_heads * config.head_dim
    for name in ("k_basis", "v_basis"):
        if name not in arrays or arrays[name].shape[1:] != (d, d):
            got = {k: tuple(a.shape) for k, a in arrays.items()}
            raise calibration.CalibrationError(
                f"cskv calibration at {where} has arrays {got}; expected k_basis and v_basis [L, {d}, {d}]"
            )
    return {name: _orthonormal(arrays[name]) for name in ("k_basis", "v_basis")}


def rank_of(density: float, config) -> int:
    """Coefficients per token for a channel `density`: N * round(density * H), at least N."""
    return config.num_kv_heads * max(1, round(density * config.head_dim))


# ---- the cache --------------------------------------------------------------------------------
def _split(c: jax.Array, n: int) -> jax.Array:
    """Joint coefficients [B, T, r] -> the per-head layout [B, N, T, r/N]."""
    b, t, r = c.shape
    return jnp.swapaxes(c.reshape(b, t, n, r // n), 1, 2)


def _join(c: jax.Array) -> jax.Array:
    """[B, N, T, r/N] -> [B, T, r]."""
    b, n, t, p = c.shape
    return jnp.swapaxes(c, 1, 2).reshape(b, t, n * p)


def _heads(x: jax.Array, n: int) -> jax.Array:
    """[B, T, N*H] -> [B, N, T, H]."""
    b, t, d = x.shape
    return jnp.swapaxes(x.reshape(b, t, n, d // n), 1, 2)


@dataclasses.dataclass(frozen=True)
class CSKVCodec:
    """Encode/decode tokens with one layer's bases k_basis [r_k, N*H], v_basis [r_v, N*H]
    (float32 numpy). bits = 0: coefficients in the cache dtype; else affine codes (module doc)."""

    config: object
    k_basis: object
    v_basis: object
    bits: int
    group: int

    def encode(self, k, v, pos, aux):
        n = self.config.num_kv_heads
        kp = rope_heads(k, pos, self.config, inverse=True)  # pre-RoPE keys, float32
        ck = _split(lowrank.project(kp, jnp.asarray(self.k_basis)), n)
        cv = _split(lowrank.project(v, jnp.asarray(self.v_basis)), n)
        out = {"pos": pos.astype(jnp.int32)}
        if not self.bits:
            return {**out, "k": ck.astype(k.dtype), "v": cv.astype(v.dtype)}
        out["k_codes"], out["k_scale"], out["k_zero"] = affine.quant_channelwise(ck, self.bits, self.group)
        out["v_codes"], out["v_scale"], out["v_zero"] = affine.quant_tokenwise(cv, self.bits, cv.shape[-1])
        return out

    def decode(self, d, aux):
        n = self.config.num_kv_heads
        pv = self.v_basis.shape[0] // n
        if not self.bits:
            ck, cv = d["k"], d["v"]
        else:
            ck = affine.dequant_channelwise(d["k_codes"], d["k_scale"], d["k_zero"], self.bits, self.group)
            cv = affine.dequant_tokenwise(d["v_codes"], d["v_scale"], d["v_zero"], self.bits, pv, pv)
        hi = "highest"
        k = jnp.einsum("btr,rd->btd", _join(ck).astype(jnp.float32), jnp.asarray(self.k_basis), precision=hi)
        v = jnp.einsum("btr,rd->btd", _join(cv).astype(jnp.float32), jnp.asarray(self.v_basis), precision=hi)
        return rope_heads(_heads(k, n), d["pos"], self.config), _heads(v, n), d["pos"]


@register
@dataclasses.dataclass(frozen=True)
class CSKV(QuantPolicy):
    """k_density / v_density: fraction of the N*H key / value channels kept as coefficients
    (in (0, 1]); window: recent tokens kept exact; group: tokens converted per flush (and the
    key coefficients' quantization group); bits: 0 = float coefficients, else 2/4/8-bit codes;
    calibration: artifact directory ("" = the user cache's, else the one shipped for SmolLM2)."""

    name = "cskv"
    k_density: float = 0.5
    v_density: float = 0.5
    window: int = 32
    group: int = 32
    bits: int = 0
    calibration: str = ""
    needs_positions: ClassVar[bool] = True

    def __post_init__(self):
        for key in ("k_density", "v_density"):
            x = getattr(self, key)
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < x <= 1.0:
                raise PolicyError(f"cskv: {key}={x!r} must be a fraction of the channels kept, in (0, 1]")
        if not isinstance(self.window, int) or self.window < 0:
            raise PolicyError(f"cskv: window={self.window!r} must be an integer >= 0 (recent tokens kept exact)")
        if self.bits not in COEF_BITS:
            raise PolicyError(f"cskv: bits={self.bits!r} must be one of {COEF_BITS} (0 = float coefficients)")
        per = packing.codes_per_word(self.bits) if self.bits else 1
        if not isinstance(self.group, int) or self.group <= 0 or self.group % per:
            raise PolicyError(
                f"cskv: group={self.group!r} must be a positive integer"
                + (f", a multiple of {per} (the {self.bits}-bit codes a word holds)" if per > 1 else "")
            )

    @property
    def residual(self) -> int:  # the engine's residual window R
        return self.window

    def block(self, ctx: LayerContext) -> int:
        return self.group

    def ranks(self, config) -> tuple[int, int]:
        return rank_of(self.k_density, config), rank_of(self.v_density, config)

    def check_config(self, config):
        super().check_config(config)
        load_bases(config, self.calibration)

    def codec(self, ctx: LayerContext):
        bases = load_bases(ctx.config, self.calibration)
        rk, rv = self.ranks(ctx.config)
        return CSKVCodec(
            ctx.config,
            bases["k_basis"][ctx.layer, :rk],
            bases["v_basis"][ctx.layer, :rv],
            self.bits,
            self.group,
        )

    def ingest(self, slots_state, ctx: LayerContext):
        raise PolicyError(
            "cskv stores each token's keys and values of all KV heads as one coefficient vector, so it "
            "cannot store another policy's per-head selection; use cskv alone (or cskv:...+kivi:bits=B)"
        )

    def absorb(self, quantizer):
        """``cskv:...+kivi:bits=B[,group=G]``: the coefficients quantized with KIVI's bits and group
        (the window stays CSKV's). Other quantizers do not compose with the coefficients."""
        from ..quant.kivi import KIVI

        if not isinstance(quantizer, KIVI):
            raise PolicyError(
                f"cskv composes only with kivi (its coefficients quantized as KIVI quantizes K and V); "
                f"got {quantizer.spec()!r}"
            )
        if quantizer.v_bits and quantizer.v_bits != quantizer.bits:
            raise PolicyError(f"cskv+kivi: v_bits={quantizer.v_bits} must equal bits={quantizer.bits}")
        if quantizer.bits not in COEF_BITS:
            raise PolicyError(f"cskv+kivi: bits={quantizer.bits} must be one of {COEF_BITS[1:]}")
        return dataclasses.replace(self, bits=quantizer.bits, group=quantizer.group)


# ---- calibration ------------------------------------------------------------------------------
def fit_bases(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The closed-form CSKV factor of stacked tokens x [L, T, N, H] (pre-RoPE keys or values):
    per layer all N*H right singular vectors, strongest first (eigenvectors of the Gram matrix,
    `kvjax.lowrank.fit_basis`): basis [L, N*H, N*H] float32 (rows) and the squared singular
    values [L, N*H]. Its first r rows minimise ||X - X B^T B|| over rank-r factors."""
    xh = jnp.swapaxes(jnp.asarray(x, jnp.float32), 1, 2)  # [L, N, T, H]: layers as the batch axis
    basis, eig = lowrank.fit_basis(lowrank.gram(xh), xh.shape[1] * xh.shape[3])
    return np.asarray(basis, np.float32), np.asarray(eig, np.float32)


@calibration.calibrator(METHOD)
def calibrate_svd(stats: dict, config) -> dict:
    """`kvjax calibrate --method cskv`: the closed-form bases of the pre-RoPE keys and the values
    of `calibration.collect` statistics, stored in float16 (re-orthonormalised on load), with
    their spectra."""
    kb, ke = fit_bases(stats["k_pre"])
    vb, ve = fit_bases(stats["v"])
    return {"k_basis": kb.astype(np.float16), "v_basis": vb.astype(np.float16), "k_eig": ke, "v_eig": ve}


def attention_inputs(model, tokens) -> np.ndarray:
    """The normed hidden states every attention layer projects to q/k/v, for tokens [T]:
    [L, T, D] float32 (captured from the model's `input_layernorm` outputs)."""
    from ..models.llama import Llama
    from .dense import Dense

    cfg = model.config
    toks = jnp.asarray(np.asarray(tokens, np.int32))[None]
    t = toks.shape[1]
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    state = Dense().init_state(cfg, 1, t, 0, jnp.float32)
    ctx = LayerContext(0, cfg, "prefill", True, t, 0)
    net = Llama(cfg, Dense(), dtype=jnp.float32, param_dtype=jnp.float32)

    def run(params):
        _, inter = net.apply(
            params,
            toks,
            pos,
            state.layers,
            ctx,
            capture_intermediates=lambda mdl, _: mdl.name == "input_layernorm",
            mutable=["intermediates"],
        )
        return jnp.stack(
            [inter["intermediates"][f"layers_{i}"]["input_layernorm"]["__call__"][0][0] for i in range(cfg.num_layers)]
        )

    return np.asarray(jax.jit(run)(model.params), np.float32)


def _kernel(params, config, layer: int, which: int) -> np.ndarray:
    """Layer `layer`'s key (which=1) or value (which=2) projection kernel [D, N*H] float32, from
    q/k/v_proj or a fused qkv_proj (`kvjax.models.fuse` layout)."""
    from ..models.llama import split_groups
    from ..native.weights import float_weight

    attn = params["params"][f"layers_{layer}"]["self_attn"]
    if "qkv_proj" in attn:
        nq, nkv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        w = np.asarray(float_weight(attn["qkv_proj"]["kernel"]), np.float32)
        return np.asarray(split_groups(jnp.asarray(w), (nq, nkv, nkv), config.fused_groups)[which])
    return np.asarray(float_weight(attn[("q_proj", "k_proj", "v_proj")[which]]["kernel"]), np.float32)


def asvd_bases(model, tokens, alpha: float = 0.5) -> dict:
    """The paper's ASVD initialisation (Yuan et al. 2023, arXiv:2312.05821): per layer the
    right singular vectors of diag(s) W, s = mean |x|^alpha over the calibration tokens' attention
    inputs x [T, D], W the key (value) projection [D, N*H]. The cache then stores x W B^T =
    K B^T, as the closed form does with its own B. Keys normed per head before RoPE (qk_norm)
    are not linear in W, so such models take the closed form only."""
    cfg = model.config
    if cfg.qk_norm:
        raise PolicyError(f"cskv: the ASVD variant needs keys linear in k_proj; {cfg.name} norms them (qk_norm)")
    x = attention_inputs(model, tokens)
    out = {"k_basis": [], "v_basis": []}
    for layer in range(cfg.num_layers):
        s = np.mean(np.abs(x[layer]), axis=0) ** alpha
        for key, w in (
            ("k_basis", _kernel(model.params, cfg, layer, 1)),
            ("v_basis", _kernel(model.params, cfg, layer, 2)),
        ):
            _, _, vt = np.linalg.svd(s[:, None].astype(np.float64) * w, full_matrices=True)
            out[key].append(vt.astype(np.float32))
    return {k: np.stack(v) for k, v in out.items()}


def reconstruction_error(x: np.ndarray, basis: np.ndarray, rank: int) -> float:
    """Relative squared error ||X - X B_r^T B_r||^2 / ||X||^2 of tokens x [L, T, N, H] with the
    first `rank` rows of each layer's basis [L, D, D], over all layers."""
    xf = np.asarray(x, np.float64).reshape(x.shape[0], x.shape[1], -1)
    b = np.asarray(basis, np.float64)[:, :rank]
    rec = np.einsum("ltr,lrd->ltd", np.einsum("ltd,lrd->ltr", xf, b), b)
    return float(np.sum((xf - rec) ** 2) / np.sum(xf**2))


def finetune_factors(x: np.ndarray, basis: np.ndarray, rank: int, steps: int = 300, lr: float = 1e-3):
    """The paper's training of the factors on the reconstruction loss, with optax (Adam): from a
    basis's first `rank` rows (e.g. ASVD's) as down factor A = B_r^T [D, r] and up factor B_r
    [r, D], minimise mean ||x - x A B||^2 / mean ||x||^2 over tokens x [T, D] (one layer's stacked
    keys or values). Returns (A, B, losses per step). The closed form is this loss's optimum
    (A = B^T = the top right singular vectors), so fine-tuning only closes the gap from another
    start; the policy stores the closed form's orthonormal basis."""
    import optax

    xf = jnp.asarray(np.asarray(x, np.float32).reshape(x.shape[0], -1))
    b0 = jnp.asarray(np.asarray(basis, np.float32)[:rank])
    scale = jnp.mean(jnp.sum(xf * xf, axis=-1))

    def loss(f):
        rec = (xf @ f["a"]) @ f["b"]
        return jnp.mean(jnp.sum((xf - rec) ** 2, axis=-1)) / scale

    opt = optax.adam(lr)
    f = {"a": b0.T, "b": b0}
    state = opt.init(f)

    @jax.jit
    def step(f, state):
        val, g = jax.value_and_grad(loss)(f)
        upd, state = opt.update(g, state, f)
        return optax.apply_updates(f, upd), state, val

    losses = []
    for _ in range(steps):
        f, state, val = step(f, state)
        losses.append(float(val))
    return np.asarray(f["a"]), np.asarray(f["b"]), losses


def calibrate(model, text: str, tokens: int = 1024, out: str | None = None, variant: str = "svd") -> tuple[str, dict]:
    """Collect `tokens` tokens of `text` through `model` and save CSKV bases to `out` (default:
    the user cache, where the policy looks first). variant: "svd" (closed form) or "asvd" (the
    paper's initialisation). Returns (path, {array: shape})."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} must be one of {VARIANTS}")
    calibration.check_tokens(METHOD, model.config, tokens)
    ids = calibration._first_tokens(model.tokenizer, text, tokens)
    if variant == "svd":
        arrays = calibrate_svd(calibration.collect(model, ids), model.config)
    else:
        arrays = {k: v.astype(np.float16) for k, v in asvd_bases(model, ids).items()}
    path = calibration.save(
        out or calibration.cache_path(METHOD, model.config),
        METHOD,
        model.config,
        arrays,
        {"tokens": tokens, "variant": variant},
    )
    calibration._restore.cache_clear()
    _ORTHO.clear()
    return path, {k: list(v.shape) for k, v in arrays.items()}
