"""Pieces the benchmark scripts share."""

from __future__ import annotations


def random_params(cfg, dtype):
    """Random weights (normal(0.02)) for `cfg` in `dtype`, made on the default device by one
    small jitted generator per distinct shape (fast to compile, no host copy of the model)."""
    import jax
    import jax.numpy as jnp

    from kvjax.models import init_params

    shapes = jax.eval_shape(lambda k: init_params(cfg, k, dtype), jax.random.key(0))
    gens = {}

    def make(i, leaf):
        key = (leaf.shape, str(leaf.dtype))
        if key not in gens:
            gens[key] = jax.jit(lambda k, s=leaf.shape: (jax.random.normal(k, s, jnp.float32) * 0.02).astype(dtype))
        return gens[key](jax.random.key(i))

    leaves, tree = jax.tree_util.tree_flatten(shapes)
    return jax.tree_util.tree_unflatten(tree, [make(i, l) for i, l in enumerate(leaves)])
