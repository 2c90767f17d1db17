"""Host-resident state leaves (`kvjax.host`): placement, semantics, bytes, and the decode loop.

On CPU, JAX offers the same memory kinds as on a GPU ("pinned_host" next to the device's
memory): the leaves ShadowKV and the offload policy keep in host memory must carry that memory
kind after prefill and decode, the host-side gathers must return what `jnp.take_along_axis`
returns, and the compiled decode loop must keep host leaves out of its carry and never copy a
whole one (checked in the traced program and the compiled HLO, against a policy built to do it).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import core

import kvjax
from kvjax import host
from kvjax.analysis import serving_estimate
from kvjax.generation import decode, prefill
from kvjax.policies import PolicyError, parse_policy
from kvjax.policies.shadowkv import ShadowKV
from kvjax.sampling import Sampler

SPECS = ("shadowkv:rank=16,budget=32", "offload:window=32,block=64,topk=1")
NEW = 8


def _prompt(cfg, b=2, t=128):
    rng = np.random.default_rng(3)
    return jnp.asarray(rng.integers(3, cfg.vocab_size, (b, t)), jnp.int32), jnp.asarray([t, t - 30], jnp.int32)


def _prefill(params, cfg, pol):
    tokens, lengths = _prompt(cfg)
    return prefill(params, tokens, lengths, config=cfg, policy=pol, max_new_tokens=NEW)


def _decode_kw(cfg, pol):
    return dict(config=cfg, policy=pol, max_new_tokens=NEW, sampler=Sampler(), stop_ids=())


def _kinds(state):
    return [leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.layers)]


def test_cpu_has_a_host_memory_kind():
    assert host.host_memory_kind() == "pinned_host"
    assert host.placement("auto", "x") and not host.placement("device", "x")
    with pytest.raises(ValueError, match="offload='nowhere'; expected one of"):
        host.placement("nowhere", "x")


def test_host_gather_slice_and_write_equal_numpy():
    x = np.arange(2 * 3 * 16 * 4, dtype=np.float32).reshape(2, 3, 16, 4)
    xh = host.to_host(jnp.asarray(x))
    assert xh.sharding.memory_kind == "pinned_host" and host.is_host(xh)
    idx = np.array([[[1, 2], [3, 4], [15, 0]], [[0, 1], [2, 3], [9, 14]]], np.int32)

    @jax.jit
    def f(xh, idx, start):
        upd = jnp.full((2, 3, 2, 4), -1.0)
        return (
            host.take_along_axis(xh, idx[..., None], axis=2),
            host.slice_tokens(xh, start, 4),
            host.write(xh, upd, start),
        )

    got, sl, written = f(xh, jnp.asarray(idx), jnp.int32(5))
    np.testing.assert_array_equal(got, np.take_along_axis(x, idx[..., None], axis=2))
    np.testing.assert_array_equal(sl, x[:, :, 5:9])
    want = x.copy()
    want[:, :, 5:7] = -1.0
    np.testing.assert_array_equal(written, want)
    assert got.sharding.memory_kind == "device" and sl.sharding.memory_kind == "device"
    assert written.sharding.memory_kind == "pinned_host"


@pytest.mark.parametrize("spec", SPECS)
def test_host_leaves_stay_in_host_memory_through_prefill_and_decode(spec, tiny_params, tiny_config):
    pol = parse_policy(spec)
    init = pol.init_state(tiny_config, 2, 128, NEW, jnp.float32)
    assert {init.layers[0].kv.k.sharding.memory_kind, init.layers[0].kv.v.sharding.memory_kind} == {"pinned_host"}
    logits, state = _prefill(tiny_params, tiny_config, pol)
    kinds = _kinds(state)
    assert "pinned_host" in kinds and "device" in kinds
    on_host = {id(x) for x in jax.tree.leaves(state.layers) if x.sharding.memory_kind == "pinned_host"}
    for layer in state.layers:  # exactly the leaves the state type names
        names = ["v"] if isinstance(pol, ShadowKV) else ["k", "v"]
        assert {id(getattr(layer, n)) for n in names} <= on_host
    # bytes: the host leaves, from the arrays and from shapes alone
    host_bytes = sum(x.nbytes for x in jax.tree.leaves(state.layers) if x.sharding.memory_kind == "pinned_host")
    assert state.host_bytes == host_bytes > 0 and state.device_bytes == state.kv_bytes_held - host_bytes
    tokens, lengths = _prompt(tiny_config)
    _, shapes = jax.eval_shape(
        lambda p, t, n: prefill(p, t, n, config=tiny_config, policy=pol, max_new_tokens=NEW),
        tiny_params,
        tokens,
        lengths,
    )
    assert shapes.host_bytes == host_bytes and shapes.kv_bytes_read_per_step == state.kv_bytes_read_per_step
    stats = state.byte_stats(tiny_config)
    assert stats["host_bytes"] == host_bytes and stats["device_bytes"] == state.device_bytes
    kept = [np.asarray(x) for x in jax.tree.leaves(state.layers) if x.sharding.memory_kind == "pinned_host"]
    _, _, after = decode(tiny_params, state, logits, jax.random.key(0), **_decode_kw(tiny_config, pol))
    assert _kinds(after) == kinds
    again = [x for x in jax.tree.leaves(after.layers) if x.sharding.memory_kind == "pinned_host"]
    for a, b in zip(kept, again):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("spec", SPECS)
def test_device_placement_and_backends_without_host_memory(spec, tiny_params, tiny_config, monkeypatch):
    """offload='device' keeps everything on the device and decodes the same tokens; a backend
    without a host memory kind gets the device under 'auto' (the fallback) and an error under
    'host'."""
    pol = parse_policy(spec)
    logits, state = _prefill(tiny_params, tiny_config, pol)
    want = decode(tiny_params, state, logits, jax.random.key(0), **_decode_kw(tiny_config, pol))[0]
    dev = parse_policy(spec + ",offload=device")
    logits, state = _prefill(tiny_params, tiny_config, dev)
    assert set(_kinds(state)) == {"device"} and state.host_bytes == 0
    got = decode(tiny_params, state, logits, jax.random.key(0), **_decode_kw(tiny_config, dev))[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    monkeypatch.setattr(host, "host_memory_kind", lambda device=None: None)
    assert not host.placement("auto", "x")
    # (another spec than above: placement is decided when a program is traced, and jit would reuse it)
    auto = parse_policy(spec.replace("budget=32", "budget=24").replace("topk=1", "topk=2") + ",offload=auto")
    assert set(_kinds(_prefill(tiny_params, tiny_config, auto)[1])) == {"device"}
    with pytest.raises(PolicyError, match="offload='host' needs a host memory kind \\('pinned_host'\\)"):
        parse_policy(spec + ",offload=host").init_state(tiny_config, 1, 128, NEW)


# ---- the decode loop -------------------------------------------------------------------------


def _eqns(jaxpr):
    """Every equation, nested ones too, except inside host computations (`kvjax.host._on_host`)."""
    for eqn in jaxpr.eqns:
        yield eqn
        if eqn.primitive.name == "compute_on":
            continue
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                if isinstance(sub, core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, core.Jaxpr):
                    yield from _eqns(sub)


def _on_host(aval) -> bool:
    return getattr(aval, "memory_space", None) == jax.memory.Space.Host


def host_leaf_copies(closed) -> list[str]:
    """What a traced decode does wrong with host leaves inside its while loops: a host leaf in
    the loop carry, or an operation in the loop body that makes a device array of a host leaf's
    shape (a whole-leaf copy to the device)."""
    bad = []
    for eqn in _eqns(closed.jaxpr):
        if eqn.primitive.name != "while":
            continue
        skip = eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]
        avals = [v.aval for v in eqn.invars]
        bad += [f"host leaf {a} carried" for a in avals[skip:] if _on_host(a)]
        shapes = {(a.shape, a.dtype) for a in avals if _on_host(a)}
        for e in _eqns(eqn.params["body_jaxpr"].jaxpr):
            for o in e.outvars:
                a = o.aval
                if (getattr(a, "shape", None), getattr(a, "dtype", None)) in shapes and not _on_host(a):
                    bad.append(f"{e.primitive.name} makes a device {a} in the loop body")
    return bad


def _compiled_loop_copies(text: str, shapes: set[str]) -> list[str]:
    """Lines of the compiled HLO's while-loop bodies (fusions excluded) that produce an array of
    a host leaf's HLO shape other than by passing it through (parameter, tuple element)."""
    comps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{") and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name and line.startswith("  "):
            comps[name].append(line.strip())
    bodies = {m for lines in comps.values() for ln in lines for m in re.findall(r"body=%?([\w.\-]+)", ln)}
    bad = []
    for c in bodies:
        for ln in comps.get(c, []):
            m = re.match(r"(?:ROOT )?%[\w.\-]+ = (\w+\[[\d,]*\])\S* (\w[\w\-]*)\(", ln)
            if m and m.group(1) in shapes and m.group(2) not in ("get-tuple-element", "parameter", "tuple", "bitcast"):
                bad.append(ln[:140])
    return bad


class WholeCopyShadowKV(ShadowKV):
    """A defective ShadowKV: each step moves the whole host value leaf to the device and gathers
    there (what the loop must never do)."""

    def _step(self, state, q, k, v, q_pos, ctx):
        st, out = super()._step(state.replace(v=host.to_device(state.v)), q, k, v, q_pos, ctx)
        return st.replace(v=state.v), out


@pytest.mark.parametrize("spec", SPECS)
def test_decode_loop_holds_no_per_step_copy_of_a_host_leaf(spec, tiny_params, tiny_config):
    pol = parse_policy(spec)
    logits, state = _prefill(tiny_params, tiny_config, pol)
    kw = _decode_kw(tiny_config, pol)
    closed = jax.make_jaxpr(lambda p, s, lg: decode(p, s, lg, jax.random.key(0), **kw))(tiny_params, state, logits)
    assert host_leaf_copies(closed) == []
    host_leaves = [x for x in jax.tree.leaves(state.layers) if x.sharding.memory_kind == "pinned_host"]
    names = {"float32": "f32", "int32": "s32"}
    shapes = {f"{names[str(x.dtype)]}[{','.join(map(str, x.shape))}]" for x in host_leaves}
    text = decode.lower(tiny_params, state, logits, jax.random.key(0), **kw).compile().as_text()
    assert re.search(r"body=", text), "no while loop in the compiled decode"
    assert _compiled_loop_copies(text, shapes) == []
    # the checks catch a whole-leaf copy per step
    if isinstance(pol, ShadowKV):
        bad = WholeCopyShadowKV(**{k: getattr(pol, k) for k in pol.parameters()})
        closed = jax.make_jaxpr(lambda p, s, lg: decode(p, s, lg, jax.random.key(0), **_decode_kw(tiny_config, bad)))(
            tiny_params, state, logits
        )
        assert any("device_put makes a device" in x for x in host_leaf_copies(closed))


@pytest.mark.parametrize("spec", SPECS)
def test_a_chunked_prefill_never_holds_the_prompts_kv_on_the_device(spec, tiny_params, tiny_config):
    """With prefill_chunk=64 the traced prefill makes no device array of the prompt's K or V
    size [B, N, S, H] (the store is made and written in host memory, attention reads it back a
    chunk at a time); a whole-prompt prefill of course does."""
    cfg = tiny_config
    tokens, lengths = _prompt(cfg)
    full = (2, cfg.num_kv_heads, 128, cfg.head_dim)

    def device_kv_sized(chunk):
        def run(p, t, n):
            return prefill(p, t, n, config=cfg, policy=parse_policy(spec), max_new_tokens=NEW, prefill_chunk=chunk)

        eqns = _eqns(jax.make_jaxpr(run)(tiny_params, tokens, lengths).jaxpr)
        return [e.primitive.name for e in eqns for o in e.outvars if o.aval.shape == full and not _on_host(o.aval)]

    assert device_kv_sized(64) == []
    assert device_kv_sized(None)


class RewritingShadowKV(ShadowKV):
    """A defective ShadowKV whose decode writes its host leaf."""

    def _step(self, state, q, k, v, q_pos, ctx):
        st, out = super()._step(state, q, k, v, q_pos, ctx)
        return st.replace(v=host.write(state.v, jnp.zeros_like(state.v[:, :, :1]), 0)), out


def test_a_decode_step_that_rewrites_a_host_leaf_is_refused(tiny_params, tiny_config):
    pol = RewritingShadowKV(rank=16, budget=32)
    logits, state = _prefill(tiny_params, tiny_config, pol)
    with pytest.raises(ValueError, match="rewrote a host-resident state leaf in a decode step"):
        decode(tiny_params, state, logits, jax.random.key(0), **_decode_kw(tiny_config, pol))


def test_generate_stats_and_cost_show_device_and_host_bytes(tiny_model):
    out = kvjax.generate(tiny_model, "hello world " * 12, max_new_tokens=4, policy="shadowkv:rank=16,budget=16")
    s = out.stats
    assert s["host_bytes"] > 0 and s["device_bytes"] + s["host_bytes"] == s["kv_bytes_held"]
    assert s["host_bytes_read_per_step"] > 0
    dense = kvjax.generate(tiny_model, "hello world " * 12, max_new_tokens=4)
    assert dense.stats["host_bytes"] == 0 == dense.stats["host_bytes_read_per_step"]
    from kvjax.models.presets import PRESETS

    cfg = PRESETS["llama3.1-8b"]
    r = serving_estimate(cfg, parse_policy("shadowkv"), 32768, "h100")
    d = serving_estimate(cfg, parse_policy("dense"), 32768, "h100")
    assert r["kv_host_bytes_per_user"] > 0 and r["host_link_step_s"] > 0 and d["host_link_step_s"] == 0
    assert r["kv_device_bytes_per_user"] < 0.2 * d["kv_device_bytes_per_user"] and r["max_users"] > 5 * d["max_users"]
