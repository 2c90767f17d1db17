"""MatryoshkaKV (Lin et al., ICLR 2025): exact at full rank, PCA initialisation against numpy,
Matryoshka training through policy_params (orthonormal directions, finite losses), the greedy rank
search, heterogeneous ranks, and bad input."""

from __future__ import annotations

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, teacher_forced_logits, tiny_config

from kvjax.policies import Matryoshka, PolicyError, matryoshka, parse_policy
from kvjax.policies import matryoshka_train as mt
from kvjax.quant import calibration


@pytest.fixture(scope="module")
def setup(tiny_params, tmp_path_factory):
    model = types.SimpleNamespace(config=TINY, params=tiny_params)
    stats = calibration.collect(model, np.random.default_rng(5).integers(3, TINY.vocab_size, 96))
    arrays = matryoshka.calibrate_pca(stats, TINY)
    path = calibration.save(str(tmp_path_factory.mktemp("matryoshka")), "matryoshka", TINY, arrays)
    return model, stats, arrays, path


def _tokens(cfg, lengths=(48, 37), t=48, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, cfg.vocab_size, (len(lengths), t)), jnp.int32), jnp.asarray(lengths, jnp.int32)


def test_full_rank_decodes_exactly_as_dense_and_lower_ranks_hold_less(setup, tiny_params):
    """r = H: logits within 1e-5 of the dense cache's at every teacher-forced step, the same greedy
    tokens; r = H/4 holds a quarter of the K/V bytes."""
    *_, path = setup
    tokens, lengths = _tokens(TINY)
    h = TINY.head_dim
    dense, st_d = teacher_forced_logits(tiny_params, TINY, parse_policy("dense"), tokens, lengths, 4)
    got, st_f = teacher_forced_logits(tiny_params, TINY, Matryoshka(h, h, calibration=path), tokens, lengths, 4)
    np.testing.assert_allclose(got, dense, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), dense.argmax(-1))
    quarter = Matryoshka(h // 4, h // 4, calibration=path)
    low, st_q = teacher_forced_logits(tiny_params, TINY, quarter, tokens, lengths, 1)
    assert np.all(np.isfinite(low))
    assert [(layer.k.shape[-1], layer.v.shape[-1]) for layer in st_q.layers] == [(h // 4, h // 4)] * TINY.num_layers
    assert st_f.layers[0].k.shape[-1] == h and st_d.layers[0].k.shape[-1] == h


def test_pca_equals_numpy_svd_of_the_centred_keys(setup):
    """Each head's directions are the right singular vectors of its centred post-RoPE keys
    (values), strongest first, up to sign; the means are the token means."""
    _, stats, arrays, _ = setup
    for name, key in (("k_post", "k"), ("v", "v")):
        for layer in range(TINY.num_layers):
            for head in range(TINY.num_kv_heads):
                x = stats[name][layer, :, head].astype(np.float64)
                np.testing.assert_allclose(arrays[f"{key}_mean"][layer, head], x.mean(0), atol=1e-5)
                _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
                top = int(np.sum(s[:-1] - s[1:] > 1e-3 * s[0]))  # directions with distinct singular values
                dots = np.abs(np.sum(arrays[f"{key}_basis"][layer, head, :top] * vt[:top], axis=1))
                np.testing.assert_allclose(dots, 1.0, atol=2e-3)


def test_training_keeps_directions_orthonormal(setup):
    """Two optax steps through policy_params: finite KL and CE, the trained directions still
    orthonormal (Cayley), the means moved."""
    model, _, arrays, _ = setup
    batches = [np.random.default_rng(i).integers(3, TINY.vocab_size, (2, 24)) for i in range(2)]
    out, rows = mt.train(model, batches, arrays, steps=2, lr=1e-2, ranks=(8, 16, 32), log=lambda _: None)
    assert len(rows) == 2 and all(np.isfinite([r["loss"], r["kl"], r["ce"]]).all() for r in rows)
    gram = np.einsum("lnrh,lnsh->lnrs", out["k_basis"], out["k_basis"])
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(TINY.head_dim), gram.shape), atol=1e-5)
    assert np.abs(out["k_mean"] - arrays["k_mean"]).max() > 0


def test_cayley_equals_the_lapack_solve_and_its_gradient():
    """`mt.cayley` (unpivoted Gauss-Jordan, closed-form gradient; no LAPACK call in the training
    program) equals (I + S)^-1 (I - S) by `jnp.linalg.solve`, value and gradient, and is
    orthogonal, for skew parts far from zero too."""
    import jax

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(3, 2, 16, 16)) * 0.5, jnp.float32)
    w = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
    eye = jnp.eye(16)

    def by_solve(a):
        s = a - jnp.swapaxes(a, -1, -2)
        return jnp.linalg.solve(eye + s, jnp.broadcast_to(eye, s.shape) - s)

    q = mt.cayley(a)
    np.testing.assert_allclose(q, by_solve(a), atol=2e-5)
    np.testing.assert_allclose(q @ jnp.swapaxes(q, -1, -2), np.broadcast_to(eye, q.shape), atol=2e-5)
    loss = lambda f: lambda a: jnp.sum(jnp.sin(f(a)) * w)
    np.testing.assert_allclose(jax.grad(loss(mt.cayley))(a), jax.grad(loss(by_solve))(a), atol=1e-4)


def test_greedy_ranks_keep_the_budget_and_lose_the_least_energy():
    """With energies decreasing along each head's directions, the greedy search's lost energy
    equals the sum of the smallest removable blocks (the optimum), and the budget holds."""
    rng = np.random.default_rng(0)
    e = {k: np.sort(rng.random((3, 2, 32)), axis=-1)[..., ::-1] for k in ("k", "v")}
    ranks = mt.greedy_ranks(e, 0.5, step=8, minimum=8)
    kept = sum(np.sum(ranks[k]) for k in ranks)
    assert kept <= 0.5 * 2 * 3 * 2 * 32
    lost = sum(e[k][l, n, r:].sum() for k in e for (l, n), r in np.ndenumerate(np.asarray(ranks[k])))
    blocks = sorted(e[k][l, n, j : j + 8].sum() for k in e for l in range(3) for n in range(2) for j in (8, 16, 24))
    need = int(np.ceil((2 * 3 * 2 * 32 - 0.5 * 2 * 3 * 2 * 32) / 8))
    assert lost == pytest.approx(sum(blocks[:need]), rel=1e-9)


def test_heterogeneous_schedule(setup, tiny_params, tmp_path):
    """A schedule of per-(layer, head) ranks: each layer stores its widest head's rank; a schedule
    of H everywhere decodes as dense."""
    *_, path = setup
    h, n = TINY.head_dim, TINY.num_kv_heads
    tokens, lengths = _tokens(TINY)
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"k": [[h] * n] * TINY.num_layers, "v": [[h] * n] * TINY.num_layers}))
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps({"k": [[8, 16], [32, 8], [8, 8]], "v": [[16, 16], [8, 24], [32, 32]]}))
    dense, _ = teacher_forced_logits(tiny_params, TINY, parse_policy("dense"), tokens, lengths, 1)
    got, _ = teacher_forced_logits(
        tiny_params, TINY, Matryoshka(schedule=str(full), calibration=path), tokens, lengths, 1
    )
    np.testing.assert_allclose(got, dense, atol=1e-5, rtol=0)
    pol = Matryoshka(schedule=str(mixed), calibration=path)
    low, st = teacher_forced_logits(tiny_params, TINY, pol, tokens, lengths, 1)
    assert np.all(np.isfinite(low))
    assert [layer.k.shape[-1] for layer in st.layers] == [16, 32, 8]
    assert [layer.v.shape[-1] for layer in st.layers] == [16, 24, 32]


def test_bad_input(setup, tmp_path):
    *_, path = setup
    for bad in (0, -3, 2.5, True):
        with pytest.raises(PolicyError, match="k_rank"):
            Matryoshka(k_rank=bad)
    with pytest.raises(PolicyError, match="v_rank=33 exceeds head_dim=32"):
        Matryoshka(v_rank=33, calibration=path).validate(64, TINY)
    with pytest.raises(calibration.CalibrationError, match="another model"):
        Matryoshka(calibration=path).validate(64, tiny_config(name="other"))
    arrays = matryoshka.load_params(TINY, path)
    short = calibration.save(
        str(tmp_path / "short"), "matryoshka", TINY, {**arrays, "k_basis": arrays["k_basis"][:, :, :16]}
    )
    with pytest.raises(calibration.CalibrationError, match="full H=32 directions"):
        Matryoshka(calibration=short).validate(64, TINY)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"k": [[40, 8]] * 3, "v": [[8, 8]] * 3}))
    with pytest.raises(PolicyError, match="schedule"):
        Matryoshka(schedule=str(bad), calibration=path).validate(64, TINY)
