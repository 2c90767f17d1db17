"""Packaging: models/ and pallas_kernels/ install as kvjax.models / kvjax.pallas_kernels."""

import os
import subprocess
import sys
import zipfile

import pytest
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAPPED = {"kvjax": "kvjax", "kvjax.models": "models", "kvjax.pallas_kernels": "pallas_kernels"}


def _packages():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]["packages"]


def test_every_subpackage_is_listed():
    listed = set(_packages())
    for pkg, folder in MAPPED.items():
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__init__.py" not in files or "__pycache__" in dirpath:
                continue
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            name = pkg if rel == "." else pkg + "." + rel.replace(os.sep, ".")
            assert name in listed, f"{name} is missing from [tool.setuptools] packages in pyproject.toml"


def test_imports_under_kvjax_names():
    import kvjax.models
    import kvjax.pallas_kernels.packing

    assert "models" not in sys.modules and "pallas_kernels" not in sys.modules
    assert kvjax.models.forward and kvjax.pallas_kernels.packing.pack


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), ROOT],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("kvjax-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "kvjax/models/llama.py",
        "kvjax/pallas_kernels/packing.py",
        "kvjax/data/kjv_judges.txt",
        "kvjax/generate.py",
        "kvjax/cli/__init__.py",
    ):
        assert required in names, required
    assert not any(n.startswith(("models/", "pallas_kernels/", "tests/")) for n in names)
