"""kvjax.parallel on this process's single device: layouts, mesh table, padding, and the
errors for bad input (each message names the bad value and what was expected)."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import kvjax.parallel as kp
from kvjax import generation as G
from kvjax.parallel import kernels, layout
from kvjax.policies import Dense, PolicyError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", layout.LAYOUTS)
def test_ring_order_is_a_permutation_with_its_inverse(name):
    n = int(np.random.default_rng().integers(1, 6))
    length = layout.multiple_for(name, n) * int(np.random.default_rng().integers(1, 5))
    order = layout.ring_order(length, n, name)
    assert sorted(order.tolist()) == list(range(length))
    np.testing.assert_array_equal(order[layout.inverse_order(order)], np.arange(length))


def test_zigzag_gives_each_shard_an_early_and_a_late_chunk():
    order = layout.ring_order(16, 2, "zigzag").reshape(2, 8)
    assert order.tolist() == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]


def test_logical_spec_follows_the_table_and_drops_missing_axes():
    mesh = kp.make_mesh(seq=1)
    assert tuple(kp.logical_spec(("batch", "seq", "heads", None))) == ("data", "seq", "tensor", None)
    assert tuple(kp.logical_spec(("batch", "seq"), mesh)) == (None, None)  # size-1 axes are not sharded
    with pytest.raises(ValueError, match=r"unknown logical axis 'tokens'; expected one of"):
        kp.logical_spec(("tokens",))


def test_make_mesh_checks_the_device_count():
    with pytest.raises(ValueError, match=r"mesh data=1 x seq=3 x tensor=1 = 3 devices, but 1 devices were given"):
        kp.make_mesh(seq=3)
    with pytest.raises(ValueError, match=r"seq=0 must be a positive integer"):
        kp.make_mesh(seq=0)
    assert dict(kp.make_mesh().shape) == {"data": 1, "seq": 1, "tensor": 1}


def test_missing_mesh_axis_is_named():
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("x",))
    with pytest.raises(ValueError, match=r"mesh has no axis 'seq': its axes are \('x',\)"):
        kp.Plan(mesh)
    q = jnp.zeros((1, 4, 2, 8))
    k = jnp.zeros((1, 1, 4, 8))
    pos = jnp.arange(4)[None]
    with pytest.raises(ValueError, match=r"mesh has no axis 'ring'"):
        kp.ring_attention(q, k, k, pos, pos[:, None], mesh=kp.make_mesh(seq=1), axis="ring")


def test_width_not_a_multiple_of_the_ring_is_an_error_in_prefill(tiny_config):
    plan = kp.Plan(kp.make_mesh(seq=1))
    tokens = jnp.zeros((1, 33), jnp.int32)
    with pytest.raises(
        ValueError,
        match=r"prompt width 33 must be a multiple of 2 \(layout='zigzag' over mesh "
        r"axis 'seq' of size 1\)",
    ):
        kp.prefill({}, tokens, jnp.asarray([33]), plan=plan, config=tiny_config, policy=Dense(), max_new_tokens=4)
    with pytest.raises(ValueError, match=r"sequence length 33 must be a multiple of 4 for layout='zigzag' over 2"):
        layout.ring_order(33, 2)


def test_bad_layout_kernel_and_window_combinations():
    with pytest.raises(ValueError, match=r"layout='spiral'; expected one of \('zigzag', 'striped', 'contiguous'\)"):
        kp.Plan(kp.make_mesh(seq=1), layout="spiral")
    with pytest.raises(
        ValueError, match=r"prefix_implementation='reference' needs layout='zigzag', got layout='striped'"
    ):
        kp.Plan(kp.make_mesh(seq=1), layout="striped", prefix_implementation="reference")
    q = jnp.zeros((1, 4, 2, 8))
    k = jnp.zeros((1, 1, 4, 8))
    pos = jnp.arange(4)[None]
    with pytest.raises(ValueError, match=r"window=3 needs causal=True"):
        kp.ring_attention(q, k, k, pos, pos[:, None], mesh=kp.make_mesh(seq=1), causal=False, window=3)
    with pytest.raises(
        ValueError, match=r"prefix_implementation='cudnn' needs layout='zigzag', causal=True and self-attention"
    ):
        kp.ring_attention(
            q, k, k, pos, pos[:, None], mesh=kp.make_mesh(seq=1), layout="striped", prefix_implementation="cudnn"
        )
    with pytest.raises(
        ValueError, match=r"implementation='triton'; expected one of \('reference', 'pallas', 'cudnn'\)"
    ):
        kernels.prefix_attention(q, k, k, pos[:, 0], pos[:, 0], causal=False, implementation="triton")
    with pytest.raises(ValueError, match=r"a causal prefix block needs as many queries as keys, got T=4 and S=2"):
        kernels.prefix_attention(q, k[:, :, :2], k[:, :, :2], pos[:, 0], pos[:, 0], causal=True)


def test_old_kernel_names_still_work_with_a_warning():
    """kernel= (and "xla" for the reference) is the deprecated spelling of prefix_implementation= /
    implementation=: it still works, and the warning names the new spelling."""
    with pytest.warns(DeprecationWarning, match=r"kernel='xla' is deprecated; use prefix_implementation='reference'"):
        plan = kp.Plan(kp.make_mesh(seq=1), kernel="xla")
    assert plan == kp.Plan(kp.make_mesh(seq=1), prefix_implementation="reference") and plan.kernel is None
    with pytest.warns(DeprecationWarning, match=r"kernel='cudnn' is deprecated; use prefix_implementation='cudnn'"):
        assert kp.SeqSharded(Dense(), kernel="cudnn").prefix_implementation == "cudnn"
    with pytest.raises(ValueError, match=r"prefix_implementation='pallas' and kernel='xla' were both given"):
        kp.Plan(kp.make_mesh(seq=1), prefix_implementation="pallas", kernel="xla")
    q, pos = jnp.ones((1, 4, 2, 8)), jnp.arange(4)[None]
    k = jnp.ones((1, 1, 4, 8))
    want = kernels.prefix_attention(q, k, k, pos[:, 0] + 4, pos[:, 0] + 4, causal=True)
    with pytest.warns(DeprecationWarning, match=r"kernel='xla' is deprecated; use implementation='reference'"):
        old = kernels.prefix_attention(q, k, k, pos[:, 0] + 4, pos[:, 0] + 4, causal=True, kernel="xla")
    np.testing.assert_array_equal(old[0], want[0])


def test_policies_that_evict_while_decoding_are_refused():
    @dataclasses.dataclass(frozen=True)
    class Evicting(Dense):
        evicts_on_decode = True

    with pytest.raises(PolicyError, match=r"policy 'dense' evicts while decoding; that cannot run on a cache sharded"):
        kp.SeqSharded(Evicting())


@pytest.mark.parametrize("spec", ["snapkv:budget=0.5,window=8", "snapkv:budget=0.5,window=8+kivi:bits=2"])
def test_observation_window_eviction_is_refused_on_sharded_caches(spec):
    from kvjax.policies import parse_policy

    with pytest.raises(PolicyError, match=r"policy 'snapkv' scores the prompt with its last queries"):
        kp.SeqSharded(parse_policy(spec))
    kp.SeqSharded(parse_policy("knorm:budget=0.5+kivi:bits=2"))  # slot-local scores are fine


def test_decode_needs_the_sharded_state(tiny_config, tiny_params):
    tokens = jnp.ones((1, 8), jnp.int32)
    logits, state = G.prefill(
        tiny_params, tokens, jnp.asarray([8]), config=tiny_config, policy=Dense(), max_new_tokens=2
    )
    with pytest.raises(ValueError, match=r"decode needs the sharded state that kvjax.parallel.prefill returns"):
        kp.decode(
            tiny_params,
            state,
            logits,
            jax.random.key(0),
            plan=kp.Plan(kp.make_mesh(seq=1)),
            config=tiny_config,
            policy=Dense(),
            max_new_tokens=2,
        )


def test_generate_pads_any_prompt_length_and_matches_generate():
    import multihost_worker

    model = multihost_worker.build_model("tiny")
    prompt = "odd length " * int(np.random.default_rng().integers(1, 6)) + "!"
    ref = G.generate(model, prompt, max_new_tokens=4)
    got = kp.generate(model, prompt, mesh=kp.make_mesh(seq=1), max_new_tokens=4)
    assert got.tokens.tolist() == ref.tokens.tolist()
    assert got.stats["seq_shards"] == 1 and got.stats["kv_bytes"] > 0


FAMILY_SWITCHES = {
    "llama": dict(),
    "qwen2": dict(qkv_bias=True),
    "qwen3": dict(qk_norm=True),
    "gemma": dict(qk_norm=True, norm_offset=1.0, sandwich_norms=True, tie_embeddings=True),
}


@pytest.mark.parametrize("family", sorted(FAMILY_SWITCHES))
@pytest.mark.parametrize("fused", [False, True])
def test_every_parameter_has_a_sharding_rule(family, fused, tiny_config):
    """The rules table names every parameter the model has, with one logical axis per dimension."""
    from kvjax.loaders.convert import param_shapes
    from kvjax.models import fuse_projections

    cfg = dataclasses.replace(tiny_config, **FAMILY_SWITCHES[family])
    shapes = param_shapes(cfg)
    if fused:
        shapes, cfg = (
            jax.eval_shape(lambda p: fuse_projections(p, cfg)[0], shapes),
            dataclasses.replace(cfg, fused_projections=True),
        )
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]:
        names = kp.param_axes(tuple(k.key for k in path))
        assert len(names) == leaf.ndim, (path, names)
    specs = kp.param_shardings(shapes, cfg, kp.make_mesh(seq=1))
    assert all(s.spec == jax.sharding.PartitionSpec(*([None] * len(s.spec))) for s in jax.tree.leaves(specs))


def test_tensor_parallel_errors_name_the_field(tiny_config):
    with pytest.raises(ValueError, match=r"num_heads=6 of tiny cannot be split over the mesh axis 'tensor' of size 4"):
        kp.shard_config(tiny_config, 4)
    with pytest.raises(ValueError, match=r"no sharding rule for the parameter layers_0/mlp/swiglu/kernel"):
        kp.param_axes(("layers_0", "mlp", "swiglu", "kernel"))
    fused = dataclasses.replace(tiny_config, fused_projections=True)
    with pytest.raises(ValueError, match=r"laid out in fused_groups=1 groups, not one per shard"):
        kp.shard_config(fused, 2)
    local = kp.shard_config(dataclasses.replace(tiny_config, vocab_size=96), 2)
    assert (local.num_heads, local.num_kv_heads, local.intermediate_size, local.vocab_size) == (3, 1, 48, 48)
    assert local.vocab_parallel and local.tensor_axis == "tensor"
    assert not kp.shard_config(tiny_config, 2).vocab_parallel  # vocab 97: every shard keeps all of it
