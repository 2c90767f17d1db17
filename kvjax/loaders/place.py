"""Put a tree of parameter sources onto devices, each device reading only its own slice.

`place(sources, shardings, dtype)` builds every parameter with `jax.make_array_from_callback`:
JAX asks for the slice each addressable device holds (in a multi-host job, only this process's
devices), the source reads exactly that slice from the checkpoint in its stored dtype, it is cast
to `dtype` and handed to the device. Parameters are placed one at a time, so host memory holds
at most one parameter's slices at once (a replicated slice is read once for all the devices that
hold it), never the model. Checkpoint matrices ([out, in]) become linen kernels ([in, out]) on
the accelerator that holds them, or tile by tile on the host for a CPU backend.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .convert import Quantized
from .errors import ModelFileError
from .sources import Transposed

#: Elements checked for NaN / infinity at a time (bounds the check's temporary memory).
CHECK_CHUNK = 1 << 22


def finite(x: np.ndarray) -> bool:
    """No NaN or infinity in the float array `x` (True for other dtypes), checked CHECK_CHUNK
    elements at a time: on the exponent bits (all ones = inf or NaN) for IEEE-like 16/32/64-bit
    floats (bfloat16 included), else with `np.isfinite`."""
    import ml_dtypes

    try:
        info = ml_dtypes.finfo(x.dtype)
    except (TypeError, ValueError):
        return True  # integers, bools: GGUF blocks and the like
    flat = x.reshape(-1)
    bits = x.dtype.itemsize * 8
    if bits in (16, 32, 64) and info.nexp + info.nmant + 1 == bits:
        kind = np.dtype(f"u{x.dtype.itemsize}")
        mask = kind.type(((1 << info.nexp) - 1) << info.nmant)
        view = flat.view(kind)
        return not any(np.any((view[i : i + CHECK_CHUNK] & mask) == mask) for i in range(0, view.size, CHECK_CHUNK))
    return all(np.isfinite(flat[i : i + CHECK_CHUNK]).all() for i in range(0, flat.size, CHECK_CHUNK))


def _transposed_sharding(sharding, ndim: int):
    """The sharding of x.T when x.T has `sharding` (a NamedSharding's spec reversed)."""
    if isinstance(sharding, NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (ndim - len(sharding.spec))
        return NamedSharding(sharding.mesh, PartitionSpec(*reversed(spec)))
    return sharding


@functools.cache
def _transpose(out_sharding):
    return jax.jit(lambda x: x.T, out_shardings=out_sharding)


#: platforms whose "device" memory is host memory: matrices are transposed there on the host,
#: tile by tile (`sources.Transposed`), which needs less memory than a device transpose.
HOST_TRANSPOSE_PLATFORMS = ("cpu",)


def _place_one(src, sharding, dtype, name: str | None = None, check: bool = False) -> jax.Array:
    platform = next(iter(sharding.device_set)).platform
    if isinstance(src, Transposed) and platform not in HOST_TRANSPOSE_PLATFORMS:
        # On an accelerator the device transposes ([out, in] -> [in, out], shard by shard, no
        # communication); on a CPU the device is the host, where `Transposed.read` needs less memory.
        raw = _place_one(src.src, _transposed_sharding(sharding, len(src.shape)), dtype, name, check)
        return _transpose(sharding)(raw)
    cache: dict = {}

    def slice_of(index):
        key = tuple((s.start, s.stop) for s in index)
        if key not in cache:
            x = src.read(index)
            if check and not finite(x):
                raise ModelFileError(f"non-finite values in the weight {name} (corrupt file?)")
            cache[key] = x if dtype is None else x.astype(dtype, copy=False)
        return cache[key]

    out_dtype = src.dtype if dtype is None else dtype
    arr = jax.make_array_from_callback(tuple(src.shape), sharding, slice_of, dtype=out_dtype)
    cache.clear()
    return arr


def place(sources: dict, shardings: dict | None, dtype, check_finite: bool = True) -> dict:
    """sources: a tree of sources (and `Quantized` leaves); shardings: the same tree of
    `jax.sharding.Sharding`s, or None for the default device. Float sources are cast to `dtype`
    (None: keep each source's dtype); quantized blocks stay uint8. check_finite: every slice read
    is checked for NaN / infinity (`finite`) before it is cast; a ModelFileError names the weight."""
    from ..native.weights import QuantizedWeight

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    src_leaves, tree = jax.tree_util.tree_flatten_with_path(sources)
    shard_leaves = [default] * len(src_leaves) if shardings is None else jax.tree.leaves(shardings)
    if len(shard_leaves) != len(src_leaves):
        raise ValueError(f"{len(shard_leaves)} shardings for {len(src_leaves)} parameters")
    out = []
    for (path, src), sh in zip(src_leaves, shard_leaves):
        name = jax.tree_util.keystr(path)
        if isinstance(src, Quantized):
            w = _place_one(src.weight, sh, dtype, name, check_finite)
            out.append(QuantizedWeight(w, _place_one(src.blocks, default, None), src.kind))
        else:
            out.append(_place_one(src, sh, dtype, name, check_finite))
    return jax.tree.unflatten(tree, out)
