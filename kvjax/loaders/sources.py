"""Lazy checkpoint tensors: any rectangular slice read on demand, in the stored dtype.

A *source* has a `shape`, a `dtype` and `read(index) -> np.ndarray`, where `index` is a tuple
of `slice`s (one per dimension, step 1, as `jax.make_array_from_callback` passes them). The
loader describes every parameter as a source built from checkpoint tensors, so a device (or a
process of a multi-host job) reads exactly the slice it holds, and the re-layouts a checkpoint
needs happen per slice, never on a whole model in host memory:

    FileTensor     bytes of one tensor in a file, read with `os.preadv` (bytes counted)
    Transposed     [out, in] checkpoint matrices as linen's [in, out] kernels
    Unpermuted     llama.cpp's q/k row order undone (per head, so head-aligned slices stay local)
    Window         a contiguous part of a source along one axis (a split fused checkpoint matrix)
    Segments       parts laid side by side along one axis (fused q/k/v and gate/up projections)
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import threading
from collections.abc import Sequence

import numpy as np

#: Bytes a `Transposed` source reads at a time: its output plus one such block is its peak.
TRANSPOSE_BLOCK_BYTES = 32 << 20


def normalize(index: Sequence[slice] | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """`index` as one `slice(start, stop)` per dimension of `shape` (None: the whole array)."""
    index = tuple(index or ())
    if len(index) > len(shape):
        raise ValueError(f"index {index} has more dimensions than shape {shape}")
    index = index + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"slice {s} has step {step}; sources read contiguous slices only")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


def slice_shape(index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(s.stop - s.start for s in index)


class ByteCounter:
    """Bytes read from files (thread-safe; `make_array_from_callback` may call from threads)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.bytes = 0
        self.reads = 0

    def add(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            self.reads += 1


@dataclasses.dataclass(frozen=True, eq=False)
class FileTensor:
    """A C-order tensor stored at byte `offset` of `path`; slices come from `os.preadv` into the
    output buffer (no memory map, so file pages never count as this process's memory)."""

    path: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    counter: ByteCounter | None = None

    def read(self, index=None) -> np.ndarray:
        index = normalize(index, self.shape)
        out = np.empty(slice_shape(index), self.dtype)
        if out.size == 0:
            return out
        item = self.dtype.itemsize
        # The last axis k whose slice is partial (all later axes are whole): each read covers a
        # contiguous run of index[k] x prod(shape[k+1:]) elements; axes before k are iterated.
        k = 0
        for d in range(len(self.shape) - 1, -1, -1):
            if (index[d].start, index[d].stop) != (0, self.shape[d]):
                k = d
                break
        strides = [math.prod(self.shape[d + 1 :]) for d in range(len(self.shape))]
        run = (index[k].stop - index[k].start) * strides[k] if self.shape else 1
        flat = out.reshape(-1).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            outer = [range(index[d].start, index[d].stop) for d in range(k)]
            for n, prefix in enumerate(itertools.product(*outer)):
                elem = sum(i * strides[d] for d, i in enumerate(prefix)) + (
                    index[k].start * strides[k] if self.shape else 0
                )
                dst = flat[n * run * item : (n + 1) * run * item]
                _pread_exact(fd, dst, self.offset + elem * item, self.path)
                if self.counter is not None:
                    self.counter.add(dst.nbytes)
        finally:
            os.close(fd)
        return out


def _pread_exact(fd: int, dst: np.ndarray, offset: int, path: str) -> None:
    view = memoryview(dst)
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"{path}: file ends at byte {offset + done}, expected {len(view) - done} more bytes")
        done += n


@dataclasses.dataclass(frozen=True, eq=False)
class Transposed:
    """The 2-D `src` transposed ([out, in] -> [in, out]). A slice is filled from blocks of
    `src` rows (TRANSPOSE_BLOCK_BYTES each), so reading it costs its own size plus one block."""

    src: object

    @property
    def shape(self):
        return tuple(reversed(self.src.shape))

    @property
    def dtype(self):
        return self.src.dtype

    def read(self, index=None) -> np.ndarray:
        rows, cols = normalize(index, self.shape)  # rows over src's columns, cols over src's rows
        out = np.empty((rows.stop - rows.start, cols.stop - cols.start), self.dtype)
        width = max(1, rows.stop - rows.start) * np.dtype(self.dtype).itemsize
        step = max(1, TRANSPOSE_BLOCK_BYTES // width)
        for a in range(cols.start, cols.stop, step):
            b = min(cols.stop, a + step)
            transpose_into(out[:, a - cols.start : b - cols.start], self.src.read((slice(a, b), rows)))
        return out


def transpose_into(dst: np.ndarray, src: np.ndarray, tile: int = 256) -> None:
    """dst[:] = src.T, tile by tile (a plain strided transpose of 2-byte elements misses the
    cache on every element; tiles of `tile` x `tile` stay in it)."""
    if src.dtype.itemsize in (1, 2, 4, 8):  # copy bits: custom dtypes (bfloat16) take numpy's slow path
        kind = np.dtype(f"u{src.dtype.itemsize}")
        src, dst = src.view(kind), dst.view(kind)
    r, c = src.shape
    for i in range(0, r, tile):
        for j in range(0, c, tile):
            dst[j : j + tile, i : i + tile] = src[i : i + tile, j : j + tile].T


@dataclasses.dataclass(frozen=True, eq=False)
class Unpermuted:
    """Rows of `src` ([n_head * hd, ...]) regrouped from llama.cpp's interleaved RoPE order
    (rows viewed as (n_head, hd/2, 2)) to the rotate-half order (n_head, 2, hd/2), as
    transformers' GGUF reader does. A row slice reads the whole heads it touches."""

    src: object
    n_head: int

    @property
    def shape(self):
        return self.src.shape

    @property
    def dtype(self):
        return self.src.dtype

    def read(self, index=None) -> np.ndarray:
        index = normalize(index, self.shape)
        rows = index[0]
        hd = self.shape[0] // self.n_head
        h0, h1 = rows.start // hd, -(-rows.stop // hd)
        block = self.src.read((slice(h0 * hd, h1 * hd), *index[1:]))
        rest = block.shape[1:]
        block = block.reshape(h1 - h0, hd // 2, 2, *rest).swapaxes(1, 2).reshape(block.shape)
        return block[rows.start - h0 * hd : rows.stop - h0 * hd]


@dataclasses.dataclass(frozen=True, eq=False)
class Window:
    """`src[..., start:stop, ...]` along `axis` (a part of a fused checkpoint matrix)."""

    src: object
    axis: int
    start: int
    stop: int

    @property
    def shape(self):
        s = list(self.src.shape)
        s[self.axis] = self.stop - self.start
        return tuple(s)

    @property
    def dtype(self):
        return self.src.dtype

    def read(self, index=None) -> np.ndarray:
        index = list(normalize(index, self.shape))
        s = index[self.axis]
        index[self.axis] = slice(s.start + self.start, s.stop + self.start)
        return self.src.read(tuple(index))


@dataclasses.dataclass(frozen=True, eq=False)
class Segments:
    """Sources laid side by side along `axis` (all other dimensions equal): fused projections.
    A slice reads only the parts of the segments it overlaps, into one output buffer."""

    parts: tuple
    axis: int

    def __post_init__(self):
        shapes = {tuple(d for i, d in enumerate(p.shape) if i != self.axis) for p in self.parts}
        if len(shapes) != 1:
            raise ValueError(f"segments along axis {self.axis} disagree elsewhere: {[p.shape for p in self.parts]}")

    @property
    def shape(self):
        s = list(self.parts[0].shape)
        s[self.axis] = sum(p.shape[self.axis] for p in self.parts)
        return tuple(s)

    @property
    def dtype(self):
        return np.result_type(*[p.dtype for p in self.parts])

    def read(self, index=None) -> np.ndarray:
        index = normalize(index, self.shape)
        want = index[self.axis]
        out = np.empty(slice_shape(index), self.dtype)
        at = 0
        for p in self.parts:
            n = p.shape[self.axis]
            lo, hi = max(want.start, at), min(want.stop, at + n)
            if lo < hi:
                sub = list(index)
                sub[self.axis] = slice(lo - at, hi - at)
                dst = [slice(None)] * len(index)
                dst[self.axis] = slice(lo - want.start, hi - want.start)
                out[tuple(dst)] = p.read(tuple(sub))
            at += n
        return out


def interleave(parts: Sequence, axis: int, groups: int) -> Segments:
    """`parts` (e.g. q, k, v kernels [D, N_i]) cut into `groups` equal pieces along `axis` and laid
    out group by group: [p0_g0, p1_g0, ..., p0_g1, p1_g1, ...]. With groups = the tensor-parallel
    size, shard g of the result (an equal contiguous block) is exactly group g: the fused
    projection of its own heads (`kvjax.models.fuse`). groups=1 is plain concatenation."""
    pieces = []
    for g in range(groups):
        for p in parts:
            n = p.shape[axis]
            if n % groups:
                raise ValueError(f"a fused part of size {n} along axis {axis} cannot be cut into {groups} groups")
            size = n // groups
            pieces.append(Window(p, axis, g * size, (g + 1) * size) if groups > 1 else p)
    return Segments(tuple(pieces), axis)
