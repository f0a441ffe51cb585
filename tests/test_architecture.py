"""The package's layering: modules import only "downwards", with no import cycles.

Layers, from the bottom (a module imports its own layer and those below, never above):

1. **core**: what reads and runs a graph: ``errors``, ``dtypes``, ``settings``, ``safety``,
   ``hostmem``, ``cputhreads``, ``process``, ``loader``, ``graph``, ``convert``, ``ops``,
   ``native`` (the kernels the ops call) and ``export`` (writing params back into the proto,
   typed against a protocol of the model, not the model).
2. **runtime**: the compiled engine behind ``model(...)``: ``runtime`` (engine, weight
   layouts, fusion, XLA options, devices, segments, executable cache, AOT artifacts) and the
   old modules that re-export it (``aot``, ``devices``, ``segments``, ``fusion``).
3. **model**: :class:`~onnx2jax.model.Model` (graph, params, pure ``apply``; it creates its
   engine) and ``backend`` (the ONNX backend API over it).
4. **training**: ``train``, ``checkpoint``, ``lora``, ``nnx``.
5. **applications**: ``hub``, ``text``, ``bench``, ``coverage``, ``cli``, ``__main__``,
   ``fuzz``, ``examples`` and the package's ``__init__`` (the public API gathered).

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING`` (a type a
module needs is a dependency too), so no cycle hides behind a lazy import. An import of
``a.b`` counts as a dependency on the module ``a.b``, not on the package ``a``'s
``__init__``, which only gathers its submodules.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "onnx2jax"

LAYERS = {
    "core": (
        "errors",
        "dtypes",
        "settings",
        "safety",
        "hostmem",
        "cputhreads",
        "process",
        "loader",
        "graph",
        "convert",
        "ops",
        "native",
        "export",
    ),
    "runtime": ("runtime", "aot", "devices", "segments", "fusion"),
    "model": ("model", "backend"),
    "training": ("train", "checkpoint", "lora", "nnx"),
    "applications": ("hub", "text", "bench", "coverage", "cli", "__main__", "fuzz", "examples", ""),
}
ORDER = list(LAYERS)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    """The layer of an onnx2jax module, by its first name under the package."""
    first = module.split(".")[1] if "." in module else ""
    for layer, names in LAYERS.items():
        if first in names:
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")


def _resolve(name: str) -> str:
    """The onnx2jax module ``name`` denotes: itself, else the closest package above it (an
    attribute such as onnx2jax.example_path belongs to the package's __init__)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str) -> set[str]:
    """The onnx2jax modules ``module`` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(_resolve(n) for n in names if n.split(".")[0] == "onnx2jax")
    found.discard(module)
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def test_every_module_imports():
    """Each module imports on its own (the CLI's entry point aside, which runs the CLI)."""
    for module in MODULES:
        if module != "onnx2jax.__main__":
            importlib.import_module(module)


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_downwards(module):
    mine = ORDER.index(_layer(module))
    upwards = sorted(
        f"{target} ({_layer(target)})"
        for target in GRAPH[module]
        if ORDER.index(_layer(target)) > mine
    )
    assert not upwards, f"{module} ({_layer(module)}) imports a layer above it: {upwards}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    assert not _cycles(GRAPH), f"modules importing each other: {_cycles(GRAPH)}"


def test_only_the_model_module_reads_the_models_private_members():
    """A model's private members are the model module's own business; tools and tests use
    the public interface (``model.engine``, onnx2jax/runtime/engine.py)."""
    private = re.compile(r"\bmodel\._[A-Za-z]")
    files = [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "tests").glob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        if path != PACKAGE / "model.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The checks above can fail: the graph has the edges real imports make, and a cycle
    through a lazy import is found."""
    assert "onnx2jax.runtime.engine" in GRAPH["onnx2jax.model"]
    assert "onnx2jax.model" not in GRAPH["onnx2jax.runtime.engine"]
    assert "onnx2jax.ops.registry" in GRAPH["onnx2jax.convert"]
    assert "onnx2jax.runtime.options" in GRAPH["onnx2jax.train"]
    assert _resolve("onnx2jax.example_path") == "onnx2jax"
    assert ORDER.index(_layer("onnx2jax.model")) > ORDER.index(_layer("onnx2jax.runtime.aot"))
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_old_import_paths_keep_working():
    """The modules moved into runtime/ are still importable from where they were, as the same
    objects."""
    from onnx2jax import aot, devices, fusion, model, segments
    from onnx2jax.runtime import aot as runtime_aot
    from onnx2jax.runtime import cache, options
    from onnx2jax.runtime import devices as runtime_devices
    from onnx2jax.runtime import fusion as runtime_fusion
    from onnx2jax.runtime import segments as runtime_segments

    assert aot.export_model is runtime_aot.export_model
    assert aot.load_artifact is runtime_aot.load_artifact
    assert aot.cached_call is runtime_aot.cached_call
    assert aot.ExecutableCache is cache.ExecutableCache and aot.CACHE_ENV == cache.CACHE_ENV
    assert devices.split_devices is runtime_devices.split_devices
    assert segments.SegmentedRunner is runtime_segments.SegmentedRunner
    assert fusion.fuse_attention is runtime_fusion.fuse_attention
    assert model.inference_compiler_options is options.inference_compiler_options
    assert model.default_compiler_options is options.default_compiler_options
