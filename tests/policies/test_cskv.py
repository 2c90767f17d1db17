"""CSKV (Wang et al. 2024): exact at full density, closed-form bases against numpy's SVD, the
closed form never worse than the ASVD initialisation, coefficients quantized by '+kivi', bytes,
and bad input."""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, teacher_forced_logits, tiny_config

from kvjax.generation import prefill
from kvjax.policies import CSKV, PolicyError, cskv, parse_policy
from kvjax.quant import calibration
from kvjax.quant.base import QuantState


def _tokens(cfg, lengths=(64, 45), t=64, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, cfg.vocab_size, (len(lengths), t)), jnp.int32), jnp.asarray(lengths, jnp.int32)


@pytest.fixture(scope="module")
def stats(tiny_params):
    model = types.SimpleNamespace(config=TINY, params=tiny_params)
    ids = np.random.default_rng(3).integers(3, TINY.vocab_size, 128)
    return model, ids, calibration.collect(model, ids)


@pytest.fixture(scope="module")
def cal(stats, tmp_path_factory):
    """The tiny model's closed-form CSKV calibration (as `kvjax calibrate --method cskv` saves it)."""
    return calibration.save(str(tmp_path_factory.mktemp("cskv")), "cskv", TINY, cskv.calibrate_svd(stats[2], TINY))


def test_full_density_decodes_exactly_as_dense(tiny_params, cal):
    """k_density = v_density = 1 with a 4-token window flushed in groups of 8 (most tokens held as
    coefficients, pre-RoPE keys rotated back at their positions): logits within 1e-5 of the dense
    cache's at every teacher-forced step, the same greedy tokens."""
    tokens, lengths = _tokens(TINY)
    pol = CSKV(k_density=1.0, v_density=1.0, window=4, group=8, calibration=cal)
    dense, _ = teacher_forced_logits(tiny_params, TINY, parse_policy("dense"), tokens, lengths, 12)
    got, state = teacher_forced_logits(tiny_params, TINY, pol, tokens, lengths, 12)
    layer = state.layers[0]
    assert isinstance(layer, QuantState) and int(layer.streams[0].count.min()) >= 40
    np.testing.assert_allclose(got, dense, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got.argmax(-1), dense.argmax(-1))


def test_bases_equal_numpy_svd_up_to_sign(stats):
    """The closed-form bases are the right singular vectors of the stacked pre-RoPE keys (values)
    of each layer, strongest first, as numpy's SVD gives them (up to sign)."""
    _, _, st = stats
    for name in ("k_pre", "v"):
        basis, eig = cskv.fit_bases(st[name])
        for layer, x in enumerate(st[name]):
            xf = x.reshape(x.shape[0], -1).astype(np.float64)
            _, s, vt = np.linalg.svd(xf, full_matrices=False)
            top = int(np.sum(s > s[0] * 1e-3))  # directions with distinct, non-negligible singular values
            dots = np.abs(np.sum(basis[layer, :top] * vt[:top], axis=1))
            np.testing.assert_allclose(dots, 1.0, atol=2e-3, err_msg=f"{name} layer {layer}")
            np.testing.assert_allclose(eig[layer, :top], s[:top] ** 2, rtol=2e-3)


def test_closed_form_error_never_above_asvd(stats):
    """On the calibration tokens the closed form's reconstruction error is <= the ASVD
    initialisation's at every rank (Eckart-Young), for keys and values; both reach 0 at full rank."""
    model, ids, st = stats
    asvd = cskv.asvd_bases(model, ids)
    d = TINY.num_kv_heads * TINY.head_dim
    for name, key in (("k_pre", "k_basis"), ("v", "v_basis")):
        svd, _ = cskv.fit_bases(st[name])
        errs = [
            (cskv.reconstruction_error(st[name], svd, r), cskv.reconstruction_error(st[name], asvd[key], r))
            for r in range(1, d + 1)
        ]
        assert all(a <= b + 1e-6 for a, b in errs), [(r + 1, a, b) for r, (a, b) in enumerate(errs) if a > b + 1e-6]
        assert errs[-1][0] < 1e-6 and errs[-1][1] < 1e-6
        assert any(a < b - 1e-3 for a, b in errs)  # the closed form is strictly better somewhere


def test_finetuning_from_asvd_closes_the_gap_to_the_closed_form(stats):
    """optax fine-tuning of ASVD's factors on the reconstruction loss lowers it toward the closed
    form's error (the optimum), never below it."""
    model, ids, st = stats
    asvd = cskv.asvd_bases(model, ids)
    svd, _ = cskv.fit_bases(st["v"])
    x, r = st["v"][1], 16
    _, _, losses = cskv.finetune_factors(x, asvd["v_basis"][1], r, steps=150, lr=3e-3)
    best = cskv.reconstruction_error(st["v"][1:2], svd[1:2], r)
    assert losses[-1] < losses[0] - 1e-3
    assert losses[-1] >= best - 1e-4


def test_kivi_quantizes_the_coefficients_and_bytes_count_them(tiny_params, cal):
    """'cskv:...+kivi:bits=4' is one CSKV policy with 4-bit coefficients (KIVI's group); its state
    holds fewer bytes than float coefficients, which hold fewer than the dense cache; the bytes a
    decode step reads are the stored coefficients and window."""
    pol = parse_policy(f"cskv:k_density=0.5,v_density=0.5,window=8,calibration={cal}+kivi:bits=4,group=16")
    assert pol == CSKV(0.5, 0.5, window=8, group=16, bits=4, calibration=cal)
    assert parse_policy(pol.spec()) == pol
    tokens, lengths = _tokens(TINY)
    dense = teacher_forced_logits(tiny_params, TINY, parse_policy("dense"), tokens, lengths, 1)
    flt = teacher_forced_logits(
        tiny_params, TINY, CSKV(0.5, 0.5, window=8, group=16, calibration=cal), tokens, lengths, 1
    )
    q4 = teacher_forced_logits(tiny_params, TINY, pol, tokens, lengths, 1)
    assert q4[1].nbytes < flt[1].nbytes < dense[1].nbytes
    data = flt[1].layers[0].streams[0].data
    assert data["k"].shape[-1] == cskv.rank_of(0.5, TINY) // TINY.num_kv_heads
    assert flt[1].kv_bytes_read_per_step == flt[1].nbytes
    assert np.all(np.isfinite(q4[0])) and np.abs(q4[0] - flt[0]).max() < np.abs(flt[0] - dense[0]).max() + 1.0


def test_bad_input(tiny_params, cal):
    for bad in (0.0, -0.5, 1.5, True):
        with pytest.raises(PolicyError, match="k_density"):
            CSKV(k_density=bad)
    with pytest.raises(PolicyError, match="v_density"):
        parse_policy("cskv:v_density=2")
    with pytest.raises(PolicyError, match="window"):
        CSKV(window=-1)
    with pytest.raises(PolicyError, match="group"):
        CSKV(bits=4, group=12)
    with pytest.raises(PolicyError, match="composes only with kivi"):
        parse_policy("cskv+rtn")
    tokens, lengths = _tokens(TINY)
    with pytest.raises(PolicyError, match="per-head selection"):
        pol = parse_policy(f"snapkv:budget=0.5,window=4+cskv:calibration={cal}")
        prefill(tiny_params, tokens, lengths, config=TINY, policy=pol, max_new_tokens=2)
    other = tiny_config(name="other")
    with pytest.raises(calibration.CalibrationError, match="another model"):
        CSKV(calibration=cal).validate(64, other)
    with pytest.raises(calibration.CalibrationError, match="no cskv calibration"):
        CSKV(calibration="/nonexistent/cskv").validate(64, TINY)
