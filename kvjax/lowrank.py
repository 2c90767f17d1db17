"""The low-rank channel store: tokens kept as coefficients over a small basis of channels.

The keys (or values) of N KV heads x H channels are stored as r coefficients per token over a
basis of r orthonormal directions of the N*H channels (joint over heads, as ShadowKV and CSKV's
key factor do) or of each head's H channels (per head, MatryoshkaKV):

    joint:     coef [B, S, r],     basis [B, r, N*H] or [r, N*H]  (per row, or one for all rows)
    per head:  coef [B, N, S, r],  basis [B, N, r, H] or [N, r, H]
    rebuilt:   x ~= mean + coef @ basis  (mean [N, H] or None)

`fit_basis` computes the top-r right singular vectors of the stacked tokens (ShadowKV's
truncated SVD of a prompt's pre-RoPE keys, Sun et al. 2024, arXiv:2410.21465; CSKV's
closed-form factor) as eigenvectors of the Gram matrix X^T X, which `gram` accumulates a prompt
chunk at a time: a chunked prefill never holds every key to factor them. The coefficients
`project` stores are X V_r = U_r S_r, so `rebuild` computes U_r S_r V_r^T, the paper's
U[rows] @ SV, without dividing by singular values; at full rank (r = N*H) it returns X up to
float rounding. Keys stored pre-RoPE are rotated at their positions when rebuilt
(`rebuild_keys`); a store of pre-RoPE keys therefore keeps positions per row beside it.

`LowRankStore` holds coefficients and basis as one pytree with its byte counts; ShadowKV keeps
its prompt keys in one (a basis per row, fitted to the prompt). The channel-shrinking methods use
the same functions with bases shared by every row: CSKV (`kvjax.policies.cskv`) `project`s
pre-RoPE keys and values onto calibrated joint bases inside the quantized-cache engine's streams
(which bring the exact recent window, its flushes and coefficient quantization); MatryoshkaKV
(`kvjax.policies.matryoshka`) keeps per-head bases [N, r, H] with means and attends in the
projected space.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from .quant.base import rope_heads
from .state import leaf_nbytes


def flatten_heads(x: jax.Array) -> jax.Array:
    """[B, N, T, H] -> [B, T, N*H] (a token's channels of all heads, head-major)."""
    b, n, t, h = x.shape
    return jnp.swapaxes(x, 1, 2).reshape(b, t, n * h)


def gram(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Gram matrix of the tokens, joint over heads: x [B, N, T, H] (valid [B, T] bool marks the
    tokens that count) -> [B, N*H, N*H] float32 = sum_t x_t x_t^T. Sums of chunks' grams are the
    gram of the whole."""
    xf = flatten_heads(x).astype(jnp.float32)
    if valid is not None:
        xf = jnp.where(valid[..., None], xf, 0.0)
    return jnp.einsum("btc,btd->bcd", xf, xf, precision="highest")


def fit_basis(g: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """Top-`rank` eigenvectors of a Gram matrix g [..., D, D] (the tokens' top right singular
    vectors): basis [..., rank, D] (rows orthonormal, largest eigenvalue first) and all
    eigenvalues [..., D] in decreasing order (the squared singular values: the spectrum)."""
    d = g.shape[-1]
    if not (isinstance(rank, int) and 1 <= rank <= d):
        raise ValueError(f"rank={rank!r} must be an integer in [1, {d}] (the channels factored)")
    w, v = jnp.linalg.eigh(g.astype(jnp.float32))  # ascending
    w, v = jnp.flip(w, axis=-1), jnp.flip(v, axis=-1)
    return jnp.swapaxes(v[..., :rank], -1, -2), w


def energy_captured(eigenvalues: jax.Array, ranks) -> list[float]:
    """Fraction of the squared Frobenius norm the top r directions hold, for each r in `ranks`
    (eigenvalues [D] in decreasing order, as `fit_basis` returns them)."""
    w = jnp.maximum(eigenvalues.astype(jnp.float32), 0.0)
    total = jnp.sum(w)
    return [float(jnp.sum(w[:r]) / total) for r in ranks]


def per_head(basis: jax.Array, num_heads: int) -> jax.Array:
    """A joint basis [..., r, N*H] viewed per head: [..., N, r, H]."""
    *lead, r, d = basis.shape
    return jnp.moveaxis(basis.reshape(*lead, r, num_heads, d // num_heads), -2, -3)


def project(x: jax.Array, basis: jax.Array) -> jax.Array:
    """Joint coefficients of x [B, N, T, H] over basis [B, r, N*H] (or [r, N*H]): [B, T, r]
    float32 (x_flat @ basis^T)."""
    xf = flatten_heads(x).astype(jnp.float32)
    eq = "btd,brd->btr" if basis.ndim == 3 else "btd,rd->btr"
    return jnp.einsum(eq, xf, basis.astype(jnp.float32), precision="highest")


def take_rows(coef: jax.Array, rows: jax.Array) -> jax.Array:
    """Coefficients of the tokens rows [B, N, K] (per head): joint coef [B, S, r] or per-head
    coef [B, N, S, r] -> [B, N, K, r]. Rows must be in range."""
    if coef.ndim == 3:
        b, _, r = coef.shape
        n, k = rows.shape[1:]
        flat = jnp.take_along_axis(coef, rows.reshape(b, n * k, 1), axis=1)
        return flat.reshape(b, n, k, r)
    return jnp.take_along_axis(coef, rows[..., None], axis=2)


def rebuild(coef_rows: jax.Array, basis_heads: jax.Array, mean: jax.Array | None = None) -> jax.Array:
    """Tokens from their coefficients: coef_rows [B, N, K, r] and a per-head basis [B, N, r, H]
    (or [N, r, H]) -> [B, N, K, H] float32 (+ mean [N, H])."""
    eq = "bnkr,bnrh->bnkh" if basis_heads.ndim == 4 else "bnkr,nrh->bnkh"
    out = jnp.einsum(eq, coef_rows.astype(jnp.float32), basis_heads.astype(jnp.float32), precision="highest")
    return out if mean is None else out + mean.astype(jnp.float32)[None, :, None, :]


@struct.dataclass
class LowRankStore:
    """Tokens as coefficients over a basis (module doc): coef [B, S, r] (joint) or
    [B, N, S, r] (per head); basis [B, r, N*H] / [r, N*H] (joint) or [B, N, r, H] / [N, r, H]
    (per head); mean [N, H] or None. Row s of coef is the token at slot s; what the slots hold
    (positions) is kept by the owner. num_heads: N (static)."""

    coef: jax.Array
    basis: jax.Array
    mean: jax.Array | None = None
    num_heads: int = struct.field(pytree_node=False, default=1)

    @property
    def rank(self) -> int:
        return int(self.coef.shape[-1])

    @property
    def joint(self) -> bool:
        return self.coef.ndim == 3

    def basis_heads(self) -> jax.Array:
        return per_head(self.basis, self.num_heads) if self.joint else self.basis

    def rebuild(self, rows: jax.Array) -> jax.Array:
        """Tokens at slots rows [B, N, K] -> [B, N, K, H] float32 (as stored: pre-RoPE keys stay
        pre-RoPE; see `rebuild_keys`)."""
        return rebuild(take_rows(self.coef, rows), self.basis_heads(), self.mean)

    def rebuild_keys(self, rows: jax.Array, pos: jax.Array, config) -> jax.Array:
        """Pre-RoPE keys at slots rows [B, N, K], rotated at positions pos [B, N, K] (RoPE of
        `config`, `kvjax.quant.base.rope_heads`): post-RoPE keys [B, N, K, H] float32."""
        return rope_heads(self.rebuild(rows), pos, config)

    def nbytes_read(self, tokens_per_head: int, batch: int) -> int:
        """Bytes a rebuild of `tokens_per_head` slots per (row, head) reads: their coefficients
        (once per head; shared by the heads when joint), the basis, the mean."""
        heads = 1 if self.joint else self.num_heads
        coef = batch * heads * tokens_per_head * self.rank * jnp.dtype(self.coef.dtype).itemsize
        extra = leaf_nbytes(self.basis) + (0 if self.mean is None else leaf_nbytes(self.mean))
        return int(coef + extra)


def fit_store(x: jax.Array, valid: jax.Array, rank: int, dtype=None) -> tuple[LowRankStore, jax.Array]:
    """A joint store of x [B, N, T, H] (valid [B, T]): the basis of its top `rank` right singular
    vectors (per row), the coefficients of every token (invalid ones zero). Returns (store,
    eigenvalues [B, N*H])."""
    basis, w = fit_basis(gram(x, valid), rank)
    coef = jnp.where(valid[..., None], project(x, basis), 0.0)
    dtype = dtype or x.dtype
    return LowRankStore(coef.astype(dtype), basis.astype(dtype), None, x.shape[1]), w
