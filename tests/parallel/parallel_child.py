"""Multi-device checks run in a child process with fake CPU devices.

`XLA_FLAGS=--xla_force_host_platform_device_count=N` must be set before JAX starts, so
the parent tests (tests/test_parallel_*.py) run `python tests/parallel_child.py CHECK N`
and assert on the JSON this prints as its last line. Inputs are fresh random draws.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers


def tiny_config():
    from helpers import TINY_PARALLEL

    return TINY_PARALLEL


def rel_err(a, b, mask):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = np.broadcast_to(np.asarray(mask).reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), a.shape)
    d = np.where(m, a - b, 0.0)
    r = np.where(m, b, 0.0)
    return float(np.linalg.norm(d) / max(np.linalg.norm(r), 1e-30))


def check_ring(seed: int) -> dict:
    """Ring attention vs single-device attention, many cases; returns errors per case."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax import attention
    from kvjax.parallel import make_mesh, ring_attention

    cases = {
        "fp32_causal_zigzag": dict(dtype="float32", causal=True, layout="zigzag"),
        "fp32_causal_zigzag_kernel": dict(dtype="float32", causal=True, layout="zigzag", prefix="reference"),
        "fp32_causal_zigzag_pallas": dict(dtype="float32", causal=True, layout="zigzag", prefix="pallas"),
        "fp32_causal_striped": dict(dtype="float32", causal=True, layout="striped"),
        "fp32_causal_contiguous": dict(dtype="float32", causal=True, layout="contiguous"),
        "fp32_noncausal_zigzag": dict(dtype="float32", causal=False, layout="zigzag"),
        "fp32_window_zigzag": dict(dtype="float32", causal=True, layout="zigzag", window=17),
        "fp32_mass_zigzag": dict(dtype="float32", causal=True, layout="zigzag", want_mass=True),
        "bf16_causal_zigzag": dict(dtype="bfloat16", causal=True, layout="zigzag"),
        "bf16_noncausal_zigzag": dict(dtype="bfloat16", causal=False, layout="zigzag"),
        "bf16_causal_zigzag_kernel": dict(dtype="bfloat16", causal=True, layout="zigzag", prefix="reference"),
    }
    mesh = make_mesh(seq=8)
    rng = np.random.default_rng(seed)
    b, nq, n, h = 3, 8, 2, 16  # GQA: 4 query heads per KV head
    t = 8 * 2 * 6 + int(rng.integers(1, 15))  # not a multiple of 16: ring_attention pads
    out = {"T": t}
    lengths = np.array([t, int(rng.integers(t // 3, t - 1)), int(rng.integers(1, 12))])
    pos = np.where(np.arange(t)[None] < lengths[:, None], np.arange(t)[None], -1).astype(np.int32)
    key = jax.random.key(seed)
    for name, c in cases.items():
        dt = jnp.dtype(c["dtype"])
        kq, kk, kv, key = jax.random.split(key, 4)
        q = jax.random.normal(kq, (b, t, nq, h), jnp.float32).astype(dt)
        k = jax.random.normal(kk, (b, n, t, h), jnp.float32).astype(dt)
        v = jax.random.normal(kv, (b, n, t, h), jnp.float32).astype(dt)
        q_pos = jnp.asarray(pos)
        k_pos = jnp.broadcast_to(q_pos[:, None], (b, n, t))
        ref_q_pos = q_pos if c["causal"] else jnp.where(q_pos >= 0, 10**6, -1)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref = attention.attention_reference(
            *f32, ref_q_pos, k_pos, window=c.get("window"), want_mass=c.get("want_mass", False)
        )
        got = ring_attention(
            q,
            k,
            v,
            q_pos,
            k_pos,
            mesh=mesh,
            causal=c["causal"],
            layout=c["layout"],
            window=c.get("window"),
            want_mass=c.get("want_mass", False),
            prefix_implementation=c.get("prefix"),
        )
        valid = np.asarray(q_pos >= 0)
        res = {
            "out": rel_err(got.out, ref.out, valid),
            "lse": float(
                np.max(
                    np.abs(
                        np.where(valid[..., None], np.asarray(got.lse, np.float64) - np.asarray(ref.lse, np.float64), 0)
                    )
                )
            ),
        }
        res["finite"] = bool(np.all(np.isfinite(np.asarray(got.out, np.float32))))
        if c.get("want_mass"):
            res["mass"] = rel_err(got.key_mass, ref.key_mass, np.ones(ref.key_mass.shape, bool))
        out[name] = res
    return out


def _model(seed):
    import jax

    from kvjax.models.forward import init_params

    cfg = tiny_config()
    params = init_params(cfg, jax.random.key(seed))
    # larger than init's 0.02 so attention (and cache compression) visibly steers the tokens
    return cfg, jax.tree.map(lambda x: x * 6.0, params)


def _prompt(cfg, seed, b=2, w=128):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (b, w)), jnp.int32)
    lengths = jnp.asarray([w, int(rng.integers(w // 4, w - 3))][:b], jnp.int32)
    return tokens, lengths


def _axis_at(spec, i):
    return spec[i] if len(spec) > i else None


def _shard_of(x, d, shards):
    """Shard d's local leaf of a global sharded-state leaf (kvjax.parallel.context doc)."""
    import numpy as np

    spec = tuple(x.sharding.spec)
    x = np.asarray(x)
    if len(spec) > 2 and spec[2] == "seq":
        s = x.shape[2] // shards
        return x[:, :, d * s : (d + 1) * s]
    return x[d]


def held_tokens(policy, layer_state, cfg, shards, max_new):
    """The (k, v, pos) all shards of one layer hold (dequantized), concatenated on one
    device as a dense SlotKV with `max_new` free slots: what decoding must attend to."""
    import jax
    import jax.numpy as jnp

    from kvjax.state import LayerContext, SlotKV

    parts = []
    for d in range(shards):
        st = jax.tree.map(lambda x: _shard_of(x, d, shards), layer_state)
        if hasattr(st, "streams"):
            from kvjax.quant.base import dequantize_state

            store = policy.policies[-1] if hasattr(policy, "policies") else policy  # Compose: its quantizer
            parts.append(dequantize_state(store, st, LayerContext(0, cfg)))
        else:
            parts.append((st.k, st.v, st.pos))
    k, v, p = (jnp.concatenate([jnp.asarray(x[i]) for x in parts], axis=2) for i in range(3))
    k, v = k.astype(jnp.float32), v.astype(jnp.float32)
    pad = ((0, 0), (0, 0), (0, max_new), (0, 0))
    return SlotKV(
        jnp.pad(k, pad), jnp.pad(v, pad), jnp.pad(p, pad[:3], constant_values=-1), jnp.asarray(k.shape[2], jnp.int32)
    )


def check_context(seed: int, devices: int) -> dict:
    """Context-parallel prefill + decode of a tiny random Llama vs one device, per policy."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax import generation as G
    from kvjax.parallel import Plan, decode, make_mesh, prefill
    from kvjax.policies import Dense, parse_policy
    from kvjax.sampling import Sampler
    from kvjax.state import KVState

    cfg, params = _model(seed)
    tokens, lengths = _prompt(cfg, seed)
    max_new = 6
    mesh = make_mesh(seq=devices)
    key = jax.random.key(seed)
    l1, s1 = G.prefill(params, tokens, lengths, config=cfg, policy=Dense(), max_new_tokens=max_new)
    o1, _, _ = G.decode(
        params, s1, l1, key, config=cfg, policy=Dense(), max_new_tokens=max_new, sampler=Sampler(), stop_ids=()
    )
    out = {"lengths": np.asarray(lengths).tolist()}
    runs = {
        "dense": ("dense", dict()),
        "dense_striped": ("dense", dict(layout="striped")),
        "kivi2_kernel": ("kivi:bits=2,group=16,residual=16", dict(prefix_implementation="reference")),
        "knorm_kivi2": ("knorm:budget=0.5+kivi:bits=2,group=16,residual=0", dict()),
    }
    for name, (spec, kw) in runs.items():
        pol = parse_policy(spec)
        plan = Plan(mesh, **kw)
        l2, s2 = prefill(params, tokens, lengths, plan=plan, config=cfg, policy=pol, max_new_tokens=max_new)
        leaf = jax.tree.leaves(s2.layers[0])
        o2, _, _s3 = decode(params, s2, l2, key, plan=plan, config=cfg, policy=pol, max_new_tokens=max_new)
        r = {
            "logits": float(jnp.max(jnp.abs(l2 - l1))),
            "logits_scale": float(jnp.max(jnp.abs(l1))),
            "tokens": np.asarray(o2).tolist(),
            "bytes": s2.nbytes,
            "sharded": [[x.ndim, _axis_at(x.sharding.spec, 2), _axis_at(x.sharding.spec, 0)] for x in leaf],
        }
        if name == "dense":
            r["ref_tokens"] = np.asarray(o1).tolist()
        else:  # reference: dense decode over exactly what the shards hold after prefill
            layers = tuple(held_tokens(pol, st, cfg, devices, max_new) for st in s2.layers)
            ref = KVState(layers=layers, lengths=s2.lengths)
            o3, _, _ = G.decode(
                params, ref, l1, key, config=cfg, policy=Dense(), max_new_tokens=max_new, sampler=Sampler(), stop_ids=()
            )
            r["ref_tokens"] = np.asarray(o3).tolist()
        out[name] = r
    return out


def check_smollm2(devices: int) -> dict:
    """SmolLM2 greedy generation: context-parallel on `devices` fake devices vs one device."""
    from kvjax.generation import generate
    from kvjax.loaders import load
    from kvjax.parallel import generate as cp_generate
    from kvjax.parallel import make_mesh

    model = load("smollm2")
    prompts = [
        "The three most useful things to know about the ocean are",
        "Write one sentence about the moon. The moon is",
    ]
    one = generate(model, prompts, max_new_tokens=12)
    many = cp_generate(model, prompts, mesh=make_mesh(seq=devices), max_new_tokens=12)
    return {
        "one": one.tokens.tolist(),
        "many": many.tokens.tolist(),
        "texts": many.texts,
        "kv_bytes": many.stats["kv_bytes"],
    }


def main(argv):
    check, devices = argv[1], int(argv[2])
    seed = int(argv[3]) if len(argv) > 3 else int.from_bytes(os.urandom(4), "little")
    if check == "ring":
        res = check_ring(seed)
    elif check == "context":
        res = check_context(seed, devices)
    elif check == "smollm2":
        res = check_smollm2(devices)
    else:
        raise SystemExit(f"unknown check {check!r}")
    res["seed"] = seed
    print(json.dumps(res))


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[2])}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    main(sys.argv)
