"""README.md and docs/ state facts that hold: the README's Python blocks run as written, its size
stays within 12 KiB, every relative link (and #anchor) of the README, BENCHMARKS.md and docs/
resolves, every file those pages name in inline code exists, the docs' Python blocks compile, and
every `kvjax ...` line of a shell block parses
against the real command line (`kvjax <cmd> --help` exits 0, and the line's options and values
are accepted by the command's parser without running it)."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, ROOT / "BENCHMARKS.md", *DOCS]
README_MAX_BYTES = 12 * 1024

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")


def _blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    return [body for lang, body in _FENCE.findall(path.read_text()) if lang in languages]


def _prose(text: str) -> str:
    """The markdown without fenced blocks and inline code (links there are not links)."""
    return _INLINE_CODE.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = _FENCE.sub("", path.read_text())
    return {_slug(m) for m in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------- size


def test_readme_is_at_most_12_kib():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; keep it <= {README_MAX_BYTES} (move detail to docs/)"


# ---------------------------------------------------------------------------------- links


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_resolve(page):
    broken = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file: {dest})")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with anchor #{anchor} in {_rel(dest)})")
    assert not broken, f"{_rel(page)} has broken links:\n  " + "\n  ".join(broken)


def test_link_checker_sees_links_and_catches_a_broken_one(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n[ok](#title) [file](page.md#title) [gone](missing.md) `[code](not-a-link)`\n")
    targets = _LINK.findall(_prose(page.read_text()))
    assert targets == ["#title", "page.md#title", "missing.md"]
    assert _anchors(page) == {"title"}
    assert _slug("Eviction at 4k context, SmolLM2") == "eviction-at-4k-context-smollm2"
    assert _slug("`kivi`") == "kivi"


# ---------------------------------------------------------------------------------- files

_TOP = ("kvjax", "pallas_kernels", "models", "tests", "benchmarks", "colab", "docs", ".ci")
_FILE_REF = re.compile(r"`([\w./-]+\.(?:py|md|sh|ipynb|toml))`")
_EXTERNAL = {"attention_mgpu.py"}  # jax's own Pallas op that the Hopper prefill kernel adapts


@functools.cache
def _file_names() -> frozenset[str]:
    """Base names of the repository's files (top level and the folders of `_TOP`)."""
    files = [p for top in _TOP for p in (ROOT / top).rglob("*")] + list(ROOT.glob("*"))
    return frozenset(p.name for p in files if p.is_file())


def _missing_files(text: str) -> list[str]:
    """Files named in inline code (outside fenced blocks) that do not exist: a path under a top
    folder must exist as written; a bare name must be some file's name."""
    missing = []
    for ref in _FILE_REF.findall(_FENCE.sub("", text)):
        if "/" in ref:
            if ref.split("/")[0] in _TOP and not (ROOT / ref).exists():
                missing.append(ref)
        elif ref not in _file_names() and ref not in _EXTERNAL:
            missing.append(ref)
    return missing


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_files_named_exist(page):
    missing = _missing_files(page.read_text())
    assert not missing, f"{_rel(page)} names files that do not exist (renamed or removed?): {missing}"


def test_file_check_catches_a_stale_name():
    text = "`kvjax/attention.py`, `block_mask.py`, `kvjax/eval/episodes.py`, `_kivi_mgpu_merge.py`, `OUT/x.md`"
    assert _missing_files(text) == ["kvjax/eval/episodes.py", "_kivi_mgpu_merge.py"]


# ---------------------------------------------------------------------------------- Python


def _readme_python():
    params = []
    for i, code in enumerate(_blocks(README, ("python",))):
        slow = "kvjax.load(" in code or "smollm2" in code  # the real model
        params.append(pytest.param(code, id=f"block{i}", marks=[pytest.mark.slow] if slow else []))
    return params


def test_readme_has_python_blocks():
    assert _blocks(README, ("python",)), "README.md should show its quickstart as a ```python block"


@pytest.mark.parametrize("code", _readme_python())
def test_readme_python_block_runs_as_written(code, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a block must not depend on (or write into) the checkout
    exec(compile(code, str(README), "exec"), {"__name__": "__main__"})
    assert capsys.readouterr().out.strip(), "a README block should print what it shows"


@pytest.mark.parametrize("page", DOCS, ids=_rel)
def test_docs_python_blocks_compile(page):
    for i, code in enumerate(_blocks(page, ("python",))):
        compile(code, f"{_rel(page)} python block {i}", "exec")


# ---------------------------------------------------------------------------------- shell


def _kvjax_lines(page: Path) -> list[list[str]]:
    """Argument lists of the `kvjax ...` command lines in a page's shell blocks (continuation
    lines joined, comments dropped)."""
    lines = []
    for body in _blocks(page, ("bash", "sh", "shell", "")):
        for line in body.replace("\\\n", " ").splitlines():
            if line.split()[:1] == ["kvjax"]:
                lines.append(shlex.split(line, comments=True)[1:])
    return lines


def _cli_params():
    return [
        pytest.param(args, id=f"{_rel(page)}:{' '.join(args)[:60]}") for page in PAGES for args in _kvjax_lines(page)
    ]


def test_readme_shows_cli_lines():
    assert _kvjax_lines(README), "README.md should list the command line in a ```bash block"


@pytest.mark.parametrize("args", _cli_params())
def test_cli_line_parses(args):
    import typer
    from typer.testing import CliRunner

    from kvjax.cli import app

    assert args, "a bare `kvjax` line"
    name, rest = args[0], args[1:]
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, f"`kvjax {name} --help` exited {result.exit_code}:\n{result.output}"
    # Parse (and type-check) the line's options without running the command.
    group = typer.main.get_command(app)
    with group.make_context("kvjax", [name]) as parent:
        command = group.get_command(parent, name)
        assert command is not None, f"no command {name!r}"
        with command.make_context(name, list(rest), parent=parent) as ctx:
            assert ctx.params is not None
