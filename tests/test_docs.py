"""Every ```python block of README.md and docs/*.md runs, and every relative link resolves.

The blocks of one file run in order in one namespace, in a temporary working directory, so a
page reads as one script. A block whose first line is ``# not run: <reason>`` is skipped; the
docs use that only for hub downloads and long jobs.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

import pytest

from onnx2jax.ops import registry

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
SKIP = re.compile(r"#\s*not run:\s*\S")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of each ```python block of a Markdown text."""
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in BLOCK.finditer(text)]


def test_block_parser_finds_blocks_and_skips():
    text = "a\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\n# not run: hub\ny\n```\n"
    blocks = python_blocks(text)
    assert [line for line, _ in blocks] == [3, 10]
    assert blocks[0][1] == "x = 1\n"
    assert SKIP.match(blocks[1][1]) and not SKIP.match(blocks[0][1])


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_python_blocks_run(page: Path, tmp_path, monkeypatch):
    blocks = python_blocks(page.read_text())
    runnable = [(line, source) for line, source in blocks if not SKIP.match(source)]
    if not runnable:
        pytest.skip(f"{page.name} has no python block to run")
    monkeypatch.chdir(tmp_path)
    # A page may register an op of its own (docs/adding-an-op.md): keep it out of the
    # registry that later tests (the operator table) read.
    monkeypatch.setattr(registry, "_REGISTRY", copy.deepcopy(registry._REGISTRY))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for line, source in runnable:
        code = compile(source, f"{page.relative_to(ROOT)}:{line}", "exec")
        try:
            exec(code, namespace)  # noqa: S102  (the docs' own examples, from this repository)
        except Exception as error:
            raise AssertionError(
                f"{page.relative_to(ROOT)}, block at line {line}: {type(error).__name__}: {error}"
            ) from error
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize(
    "page",
    [*PAGES, ROOT / "benchmarks" / "README.md", ROOT / "onnx2jax" / "ops" / "README.md"],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_relative_links_resolve(page: Path):
    text = BLOCK.sub("", page.read_text())
    targets = [t.split("#")[0] for t in LINK.findall(text) if "://" not in t and t[0] != "#"]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"
