"""The docs' generated sections (operator table, suite count) match the code."""

from __future__ import annotations

from pathlib import Path

from onnx2jax.cli.coverage import render_operators, render_readme

ROOT = Path(__file__).resolve().parent.parent


def test_readme_generated_sections_are_current():
    readme = (ROOT / "README.md").read_text()
    assert render_readme(readme, ROOT) == readme, (
        "README.md is out of date: run `python -m onnx2jax.cli.coverage`"
    )


def test_operator_table_is_current():
    text = (ROOT / "docs" / "operators.md").read_text()
    assert "<!-- coverage:start -->" in text and "<!-- coverage:end -->" in text
    assert render_operators(text) == text, (
        "docs/operators.md is out of date: run `python -m onnx2jax.cli.coverage`"
    )


def test_readme_has_the_two_setup_commands():
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e . && onnx2jax run" in readme
    assert 'pip install -e ".[test]" && python -m pytest' in readme
    assert "python -m pytest" in (ROOT / ".ci" / "run").read_text()
