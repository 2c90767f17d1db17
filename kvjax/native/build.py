"""Compile `gguf_matmul.cc` on first use and register its XLA FFI targets (CPU).

    library = build.load()   # ctypes.CDLL, or None (with one warning naming the reason)

The shared object goes into a per-user cache directory ($KVJAX_NATIVE_CACHE, else
$XDG_CACHE_HOME/kvjax/native, else ~/.cache/kvjax/native) under a name keyed by a hash of the
source, the compiler command, the jax version and the CPU (the build uses -march=native), so a
changed input rebuilds and a stale object is never loaded. The compiler is $CXX, else `c++`,
`g++` or `clang++` from PATH. $KVJAX_NATIVE=0 turns the native kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gguf_matmul.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# Target this CPU (AVX2/AVX-512 where present); tests also build a portable "-march=x86-64" one.
ARCH_FLAGS = ("-march=native",)
# FFI target name -> exported handler symbol in the shared object.
TARGETS = {"kvjax_gguf_matmul_q4_1": "KvjaxGgufMatmulQ4_1", "kvjax_gguf_matmul_q8_0": "KvjaxGgufMatmulQ8_0"}


class NativeBuildError(RuntimeError):
    """The native kernels could not be built or loaded; the message says why."""


def find_compiler() -> str | None:
    """$CXX if set, else the first of c++, g++, clang++ on PATH; None if there is none."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def cache_dir() -> str:
    if os.environ.get("KVJAX_NATIVE_CACHE"):
        return os.environ["KVJAX_NATIVE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kvjax", "native")


def _cpu_id() -> str:
    """The CPU model and feature flags (the object is built for this CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def _command(compiler: str, arch_flags, include: str, output: str) -> list[str]:
    return [compiler, *FLAGS, *arch_flags, f"-I{include}", SOURCE, "-o", output]


def build(compiler: str | None = None, arch_flags: tuple[str, ...] = ARCH_FLAGS) -> str:
    """Compile (or find in the cache) the shared object; returns its path.
    Raises NativeBuildError naming the reason (no compiler, compiler error output)."""
    import jax

    compiler = compiler or find_compiler()
    if compiler is None:
        raise NativeBuildError("no C++ compiler found (set $CXX or install g++/clang++)")
    include = jax.ffi.include_dir()
    with open(SOURCE, "rb") as f:
        source = f.read()
    key = hashlib.sha256(
        b"\0".join(
            [
                source,
                " ".join(_command(compiler, arch_flags, include, "")).encode(),
                jax.__version__.encode(),
                _cpu_id().encode(),
            ]
        )
    ).hexdigest()[:16]
    out_dir = cache_dir()
    path = os.path.join(out_dir, f"gguf_matmul-{key}.so")
    if os.path.isfile(path):
        return path
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise NativeBuildError(f"cannot create the cache directory {out_dir}: {e}") from e
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)  # atomic rename: concurrent builds are safe
    os.close(fd)
    try:
        try:
            proc = subprocess.run(
                _command(compiler, arch_flags, include, tmp), capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NativeBuildError(f"running {compiler} failed: {e}") from e
        if proc.returncode != 0:
            raise NativeBuildError(f"{compiler} failed (exit {proc.returncode}) on {SOURCE}:\n{proc.stderr[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


_REGISTERED: dict[str, ctypes.CDLL] = {}


def register(lib: ctypes.CDLL, suffix: str = "") -> None:
    """Register the library's handlers as the CPU FFI targets TARGETS (+ suffix), once per name
    (a target name stays bound to the first library registered under it)."""
    import jax

    for target, symbol in TARGETS.items():
        if target + suffix not in _REGISTERED:
            jax.ffi.register_ffi_target(target + suffix, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
            _REGISTERED[target + suffix] = lib  # keeps the library loaded


@functools.cache
def load() -> ctypes.CDLL | None:
    """Build, load and register the FFI targets once per process. Returns the library, or None
    after one warning naming the reason (callers then use the XLA dequantize + dot path)."""
    if os.environ.get("KVJAX_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(build())
        register(lib)
        return lib
    except Exception as e:  # any failure means "no native kernel": say why once, then fall back
        warnings.warn(
            f"kvjax: the native GGUF matmul kernel is unavailable: {e} -- kvjax.load keeps float32 "
            f"weights instead, and quantized_matmul falls back to the slower XLA dequantize + dot",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def simd(lib: ctypes.CDLL | None = None) -> str | None:
    """The code path of `lib` (default: the loaded kernel): "avx512", "avx2" or "scalar";
    None if no kernel is loaded."""
    lib = lib or load()
    return None if lib is None else ("scalar", "avx2", "avx512")[lib.kvjax_gguf_matmul_simd()]
