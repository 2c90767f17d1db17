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


#: Tiny configs for the tensor-parallel checks: 8 query and 4 KV heads (tensor=4 splits them),
#: a byte vocabulary rounded up to 260 (split by 2 and 4), head_dim 32 (KIVI's groups).
TP_SIZES = dict(
    vocab_size=260, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=32,
    max_position=4096,
)  # fmt: skip
TP_FAMILIES = {
    "llama": dict(),
    "qwen3": dict(model_type="qwen3", qk_norm=True, rms_norm_eps=1e-6),
    "gemma3": dict(
        model_type="gemma3", qk_norm=True, norm_offset=1.0, sandwich_norms=True, hidden_act="gelu_tanh",
        embed_scale=True, query_pre_attn_scalar=24.0, sliding_window=16,
        layer_types=("sliding_attention", "full_attention"), rope_theta=1e6, local_rope_theta=1e4,
        tie_embeddings=True,
    ),
}  # fmt: skip


#: weight scale per family: large enough that attention steers the tokens, small enough that the
#: greedy tokens do not collapse to one (Gemma's embeddings are also scaled by sqrt(hidden)).
TP_SCALE = {"llama": 6.0, "qwen3": 6.0, "gemma3": 2.0}


def tp_model(family: str, seed: int = 5):
    """A tiny random model of `family` (weights x TP_SCALE), fused."""
    import jax
    from helpers import tiny_config
    from multihost_worker import ByteTokenizer

    from kvjax.loaders import Model
    from kvjax.models import fuse_projections
    from kvjax.models.forward import init_params

    cfg = tiny_config(name=f"tiny-tp-{family}", **TP_SIZES, **TP_FAMILIES[family])
    params = jax.tree.map(lambda x: x * TP_SCALE[family], init_params(cfg, jax.random.key(seed)))
    params, cfg = fuse_projections(params, cfg)
    return Model(cfg, params, ByteTokenizer())


TP_PROMPTS = ["Tensor parallel splits the heads of every layer over devices.", "Megatron-LM"]


def _decode_collectives(model, mesh, policy: str) -> dict:
    """Prefill on `mesh`, then compile the decode loop and list its collectives' result shapes."""
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kvjax.parallel import Plan, context, prefill, put_prompt, shard_params
    from kvjax.policies import parse_policy
    from kvjax.sampling import Sampler

    plan = Plan(mesh)
    params, cfg = shard_params(model.params, model.config, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (2, 64)).astype(np.int32)
    toks, lens = put_prompt(tokens, np.array([64, 41], np.int32), plan)
    pol = parse_policy(policy)
    logits, state = prefill(params, toks, lens, plan=plan, config=cfg, policy=pol, max_new_tokens=16, ordered=True)
    specs = tuple(context._spec_of(x) for x in jax.tree.leaves(state.layers))
    hlo = (
        context._decode.lower(
            params, state, logits, jax.random.key(0), plan=plan, config=cfg, policy=pol, max_new_tokens=16,
            sampler=Sampler(), stop_ids=(), dtype=jnp.float32, implementation=None, layer_specs=specs,
        )
        .compile()
        .as_text()
    )  # fmt: skip
    found = {}
    for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        shapes = re.findall(r"= \(?([a-z0-9]+\[[0-9,]*\])[^=]*? " + op + r"(?:-start)?\(", hlo)
        found[op] = shapes
    leaves = jax.tree.leaves(state.layers)
    found["state"] = [[list(x.shape), [a if isinstance(a, str) or a is None else list(a) for a in x.sharding.spec]]
                      for x in leaves]  # fmt: skip
    return found


def check_tensor(devices: int) -> dict:
    """Tensor parallel (alone and with the ring) vs one device: greedy tokens per family and
    policy, parameter bytes per device, and the collectives of the compiled decode."""
    import jax

    from kvjax.generation import generate
    from kvjax.parallel import generate as tp_generate
    from kvjax.parallel import make_mesh, shard_params

    four = jax.devices()[:4]
    meshes = {
        "tensor4": make_mesh(seq=1, tensor=4, devices=four),
        "tensor2_seq2": make_mesh(seq=2, tensor=2, devices=four),
        "seq2": make_mesh(seq=2, devices=jax.devices()[:2]),
    }
    snap_kivi, knorm_kivi = "snapkv:budget=0.2+kivi:bits=2", "knorm:budget=0.5+kivi:bits=2"
    runs = [  # (family, mesh, policy, reference: "one" device or another mesh's run)
        ("llama", "tensor4", "dense", "one"),
        ("llama", "tensor4", snap_kivi, "one"),
        ("llama", "tensor2_seq2", "dense", "one"),
        # The ring keeps each shard's budget of its own tokens (SeqSharded): not one device's
        # choice, so tensor x ring is compared with the ring alone.
        ("llama", "seq2", knorm_kivi, None),
        ("llama", "tensor2_seq2", knorm_kivi, "seq2"),
        ("qwen3", "tensor4", snap_kivi, "one"),
        ("gemma3", "tensor4", "snapkv:budget=0.2", "one"),  # KIVI refuses models with local layers
        ("gemma3", "tensor2_seq2", "dense", "one"),
    ]
    models = {f: tp_model(f) for f in TP_FAMILIES}
    out, tokens, one = {"runs": {}}, {}, {}
    for family, mesh, policy, ref in runs:
        got = tp_generate(models[family], TP_PROMPTS, mesh=meshes[mesh], policy=policy, max_new_tokens=8)
        tokens[(family, mesh, policy)] = got.tokens.tolist()
        if ref == "one" and (family, policy) not in one:
            one[(family, policy)] = generate(
                models[family], TP_PROMPTS, policy=policy, max_new_tokens=8
            ).tokens.tolist()
        want = one[(family, policy)] if ref == "one" else tokens.get((family, ref, policy))
        if ref is not None:
            out["runs"][f"{family}/{mesh}/{policy}"] = {
                "tokens": got.tokens.tolist(),
                "ref": want,
                "kv_bytes": got.stats["kv_bytes_after_prefill"],
            }
    params, _ = shard_params(models["llama"].params, models["llama"].config, meshes["tensor4"])
    leaves = jax.tree.leaves(params)
    dev = four[0]
    out["bytes"] = {
        "total": sum(x.nbytes for x in leaves),
        "device0": sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == dev),
        "replicated": sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated),
    }
    out["hlo"] = _decode_collectives(models["llama"], meshes["tensor2_seq2"], knorm_kivi)
    out["vocab"] = TP_SIZES["vocab_size"]
    return out


def main(argv):
    check, devices = argv[1], int(argv[2])
    seed = int(argv[3]) if len(argv) > 3 else int.from_bytes(os.urandom(4), "little")
    if check == "ring":
        res = check_ring(seed)
    elif check == "context":
        res = check_context(seed, devices)
    elif check == "smollm2":
        res = check_smollm2(devices)
    elif check == "tensor":
        res = check_tensor(devices)
    else:
        raise SystemExit(f"unknown check {check!r}")
    res["seed"] = seed
    print(json.dumps(res))


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={int(sys.argv[2])}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    main(sys.argv)
