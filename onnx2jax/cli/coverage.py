"""Doc sections generated from the code: the operator table and the backend-suite count.

``python -m onnx2jax.cli.coverage`` (the command the docs give; ``onnx2jax.cli.coverage`` works too)
rewrites the operator table in docs/operators.md and the suite count in README.md in place;
tests/test_readme.py keeps both equal to what this module generates.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import onnx

from onnx2jax import ops  # noqa: F401  (registers every op family)
from onnx2jax.ops.registry import registered_ops


def _onnx_schemas() -> dict[tuple[str, str], list[int]]:
    """Every (domain, op) the installed onnx defines, with its since_versions."""
    versions: dict[tuple[str, str], set[int]] = defaultdict(set)
    for schema in onnx.defs.get_all_schemas_with_history():
        versions[(schema.domain, schema.name)].add(schema.since_version)
    return {k: sorted(v) for k, v in versions.items()}


def source_file(module: str) -> str:
    """Where an op function of ``module`` is defined, as the operator table names it: the file
    name for the op families of onnx2jax/ops/, the module otherwise (an op registered from
    outside the package)."""
    package = "onnx2jax.ops."
    return module[len(package) :] + ".py" if module.startswith(package) else module


def coverage_table() -> str:
    """A Markdown table: one row per domain and op, the versions we implement, the file that
    implements them, and gaps."""
    ours: dict[tuple[str, str], list[int]] = defaultdict(list)
    notes: dict[tuple[str, str], str] = {}
    files: dict[tuple[str, str], list[str]] = defaultdict(list)
    for spec in registered_ops():
        key = (spec.domain, spec.op_type)
        ours[key].append(spec.since)
        if spec.note:
            notes[key] = spec.note
        file = source_file(spec.function.__module__)
        if file not in files[key]:
            files[key].append(file)
    schemas = _onnx_schemas()
    standard = {"", "ai.onnx.ml", "ai.onnx.preview.training"}
    missing = sorted(k for k in schemas if k[0] in standard and k not in ours)
    if missing:
        gaps = ", ".join(f"`{d + '::' if d else ''}{op}`" for d, op in missing)
        summary = f"{len(missing)} operators of the standard domains are not: {gaps}."
    else:
        summary = (
            "every operator that onnx " + onnx.__version__ + " defines in ai.onnx, "
            "ai.onnx.ml and ai.onnx.preview.training is (deprecated ones included)."
        )
    lines = [
        f"{len(ours)} operators implemented; " + summary,
        "",
        "| domain | operator | implemented versions (since) | file (in onnx2jax/ops/) | notes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (domain, op_type), since in sorted(ours.items()):
        known = schemas.get((domain, op_type))
        gaps = [v for v in known or [] if v > min(since) and v not in since]
        note = notes.get((domain, op_type), "")
        if gaps:
            note = (note + "; " if note else "") + "same code serves " + ", ".join(map(str, gaps))
        lines.append(
            f"| {domain or 'ai.onnx'} | {op_type} | {', '.join(map(str, since))} "
            f"| {', '.join(files[(domain, op_type)])} | {note} |"
        )
    return "\n".join(lines)


def suite_summary(test_names: list[str], expected_failures: list[str]) -> str:
    """One line per part of the ONNX backend suite: how many of its tests pass."""
    parts = {
        "node": "node tests",
        "other": "simple, pytorch-converted, pytorch-operator and light model-zoo tests",
    }
    node_tests = _node_test_names()
    failing = set(expected_failures)
    lines = []
    for part, label in parts.items():
        names = [n for n in test_names if (n in node_tests) == (part == "node")]
        passed = sum(n not in failing for n in names)
        lines.append(f"  - {passed:,} of {len(names):,} {label} pass.")
    return "\n".join(lines)


def _node_test_names() -> set[str]:
    from onnx.backend.test.loader import load_model_tests

    return {f"{t.name}_cpu" for t in load_model_tests(kind="node")}


def replace_section(text: str, name: str, body: str) -> str:
    """Replace what stands between ``<!-- name:start -->`` and ``<!-- name:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{body}\n{end}{tail}"


def render_readme(readme: str, root: Path) -> str:
    """README text with its generated section (the backend-suite count) brought up to date."""
    import warnings

    import onnx.backend.test
    from onnx.backend.base import Backend

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = onnx.backend.test.BackendTest(Backend, __name__)
    names = [
        n
        for case in runner.test_cases.values()
        for n in dir(case)
        if n.startswith("test_") and n.endswith("_cpu")
    ]
    failing = expected_failures(root / "tests" / "expected_failures.txt")
    return replace_section(readme, "suite", suite_summary(names, failing))


def render_operators(text: str) -> str:
    """docs/operators.md text with its generated operator table brought up to date."""
    return replace_section(text, "coverage", coverage_table())


def expected_failures(path: Path) -> list[str]:
    """The test names of tests/expected_failures.txt (its first column, comments skipped)."""
    lines = (line.split()[0] for line in path.read_text().splitlines() if line.strip())
    return [name for name in lines if not name.startswith("#")]


def main() -> None:
    """Rewrite the generated sections of the checkout's README.md and docs/operators.md in
    place: what ``python -m onnx2jax.cli.coverage`` runs."""
    root = Path(__file__).resolve().parents[2]
    for path, render in (
        (root / "README.md", lambda text: render_readme(text, root)),
        (root / "docs" / "operators.md", render_operators),
    ):
        path.write_text(render(path.read_text()))
        print(f"updated {path}")


if __name__ == "__main__":
    main()
