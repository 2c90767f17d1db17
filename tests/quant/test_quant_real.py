"""Quantized caches on real SmolLM2 keys and values (the shipped model; slow): KIVI's
per-group error bound, every method's reconstruction error at 4 bits against bounds, the
shipped calibration artifacts load for this model, and `kvjax calibrate` leaves them alone."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from kvjax.policies import parse_policy
from kvjax.quant import calibration
from kvjax.quant.base import dequantize_state
from kvjax.quant.kivi import KIVICodec
from kvjax.state import LayerContext, SlotKV

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real():
    from kvjax.eval import load_text
    from kvjax.loaders import load

    model = load("smollm2")
    ids = model.tokenizer.encode(load_text("kjv-judges"))
    start = np.random.default_rng().integers(0, len(ids) - 300)
    stats = calibration.collect(model, ids[start : start + 256])
    return model, stats


def _layer(stats, name, layer):
    return jnp.asarray(stats[name][layer]).transpose(1, 0, 2)[None]  # [1, N, T, H]


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_within_bound_on_real_kv(real, bits):
    model, stats = real
    h = model.config.head_dim
    for layer in (0, 14, 29):
        k, v = _layer(stats, "k_post", layer), _layer(stats, "v", layer)
        codec = KIVICodec(bits, 32, h)
        d = codec.encode(k, v, None, None)
        kd, vd, _ = codec.decode(d, None)
        kb = d.k_scale.astype(jnp.float32) / 2 * 1.01 + 2e-3 * jnp.abs(d.k_zero.astype(jnp.float32)) + 1e-6
        assert bool(jnp.all(jnp.abs(kd - k).reshape(1, 3, 8, 32, h) <= kb[:, :, :, None]))
        vb = d.v_scale.astype(jnp.float32) / 2 * 1.01 + 2e-3 * jnp.abs(d.v_zero.astype(jnp.float32)) + 1e-6
        assert bool(jnp.all(jnp.abs(vd - v).reshape(1, 3, 256, h // 32, 32) <= vb[..., None]))


# relative L2 reconstruction error of keys / values at 4 bits on real activations
BOUNDS = {
    "kivi:bits=4": 0.12,
    "rtn:bits=4": 0.18,
    "kvquant:bits=4": 0.15,
    "rotatekv:bits=4": 0.12,
    "bfp:bits=4": 0.25,
    "kv4:bits=4": 0.1,
    "zipcache:bits=4,stream_gap=32": 0.1,
}


@pytest.mark.parametrize("spec", sorted(BOUNDS))
def test_reconstruction_error_on_real_kv(real, spec):
    model, stats = real
    pol = parse_policy(spec)
    ctx = LayerContext(7, model.config, "prefill", True, 256, 0)
    k, v = _layer(stats, "k_post", 7), _layer(stats, "v", 7)
    pos = jnp.broadcast_to(jnp.arange(256, dtype=jnp.int32), k.shape[:3])
    state = pol._ingest(SlotKV(k, v, pos, jnp.asarray(256, jnp.int32)), ctx, None, own=True)
    kd, vd, pd = dequantize_state(pol, state, ctx)
    held = np.asarray(pd[0, 0]) >= 0
    assert held.sum() == 256
    if pol.needs_positions:  # tokens are stored with their positions: compare token by token
        order = np.argsort(np.asarray(pd[0]), axis=-1)[:, -256:]
        kd = jnp.take_along_axis(kd[0], order[..., None], axis=1)
        vd = jnp.take_along_axis(vd[0], order[..., None], axis=1)
        pairs = ((k[0], kd), (v[0], vd))
    elif spec.startswith("zipcache"):  # tokens re-ordered by saliency: compare the sets' norms
        pairs = ((jnp.sort(jnp.linalg.norm(k[0], axis=-1)), jnp.sort(jnp.linalg.norm(kd[0][:, held], axis=-1))),)
    else:
        pairs = ((k[0], kd[0][:, held]), (v[0], vd[0][:, held]))
    for orig, deq in pairs:
        rel = float(jnp.linalg.norm(deq - orig) / jnp.linalg.norm(orig))
        assert rel < BOUNDS[spec], (spec, rel)


@pytest.mark.parametrize("method", ["kvquant", "rotatekv", "bfp", "kv4"])
def test_shipped_calibrations_load_for_smollm2(real, method, tmp_path, monkeypatch):
    model, _ = real
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # an empty user cache: the shipped artifact is found
    assert calibration.find(method, model.config) == calibration.default_path(method, model.config)
    assert calibration.default_path(method, model.config).startswith(calibration.DATA_DIR)
    arrays = calibration.load(method, model.config)
    assert all(a.shape[0] == model.config.num_layers for a in arrays.values())


def test_calibrate_cli_never_writes_into_the_package(real, tmp_path, monkeypatch):
    """Without --out, `kvjax calibrate` for SmolLM2 (whose artifact ships in the package) writes
    to the user cache; the package's files stay byte-identical and the policies read the new one."""
    import hashlib
    from pathlib import Path

    from typer.testing import CliRunner

    from kvjax.cli import app

    def files():
        root = Path(calibration.DATA_DIR)
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
        }

    model, _ = real
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = files()
    res = CliRunner().invoke(app, ["calibrate", "--method", "bfp", "--text", "kjv-judges", "--tokens", "64"])
    assert res.exit_code == 0, res.output
    assert files() == before
    cached = calibration.cache_path("bfp", model.config)
    assert json.loads(res.output.splitlines()[-1])["path"] == cached and cached.startswith(str(tmp_path))
    assert calibration.find("bfp", model.config) == cached
    assert calibration.load("bfp", model.config)["k_perm"].shape == (30, 3, 64)
    res = CliRunner().invoke(app, ["calibrate", "--method", "kivi"])
    assert res.exit_code == 2 and "error: method='kivi' needs no calibration or is unknown" in res.output
