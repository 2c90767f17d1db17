"""Keep long-running processes below the kernel's memory-mapping limit.

Every executable XLA:CPU compiles keeps a few memory mappings of JIT code for as long as
jax's caches hold it. A process that compiles thousands of programs (a sweep over many
policies and shapes, a test suite) climbs towards vm.max_map_count (65,530 on most Linux
machines); past it LLVM's next mmap fails and XLA segfaults mid-compile (seen at ~60,000
mappings). `release_if_high()` drops jax's caches once the count passes a threshold: later
calls recompile, nothing else changes.
"""

from __future__ import annotations

import gc

import jax

DEFAULT_THRESHOLD = 30_000


def map_count() -> int:
    """Memory mappings of this process (0 where /proc is not available)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def release() -> None:
    """Drop every compiled program jax holds (and collect the garbage that pins them)."""
    jax.clear_caches()
    gc.collect()


def release_if_high(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """`release()` when the mapping count exceeds `threshold`; True if it did."""
    if map_count() > threshold:
        release()
        return True
    return False
