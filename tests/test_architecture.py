"""The package's layering: modules import only "downwards", with no import cycles.

Layers, from the bottom (a module imports its own layer and those below, never above). A
module's layer is its package's (the first name under ``onnx2jax``), with one exception named
below, ``core.model``:

1. **core**: what reads and traces a graph: ``core`` (errors, dtypes, settings, safety,
   loader, the plan ``graph``, the interpreter ``convert``, ``export``, the params' placement
   on a mesh ``sharding``), ``ops`` (the op functions and their registry, which the plan and
   the interpreter look up) and ``native`` (the CPU kernels some op functions call).
2. **runtime**: the compiled engine behind ``model(...)``: ``runtime`` (engine, weight
   layouts, fusion, XLA options, devices, segments, executable cache, AOT artifacts, the
   process-level settings).
3. **model**: ``core.model``, :class:`~onnx2jax.core.model.Model` (graph, params, pure
   ``apply``). It lives in ``core/`` with the pipeline it exposes, but it creates its
   runtime engine, so it sits above the runtime; and ``backend`` (the ONNX backend API over it).
4. **training**: ``train`` (split/fit, LoRA, checkpoints, the Flax module).
5. **applications**: ``hub``, ``text``, ``generation``, ``cli`` (with ``bench`` and
   ``coverage``), ``__main__``, ``fuzz``, ``examples`` and the package's ``__init__`` (the
   public API gathered).

The modules that moved keep a tiny module at their old path (:data:`OLD_PATHS`) that only
forwards to the new one; each belongs to the layer of what it forwards to.

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

# Names under onnx2jax: a package, a module, or (core.model) a module named apart from its
# package; the longest name that matches gives a module's layer.
LAYERS = {
    "core": ("core", "ops", "native"),
    "runtime": ("runtime",),
    "model": ("core.model", "backend"),
    "training": ("train",),
    "applications": (
        "hub",
        "text",
        "generation",
        "cli",
        "__main__",
        "fuzz",
        "examples",
        "",
    ),
}
ORDER = list(LAYERS)

# The modules that moved, by old path: the module(s) each old path forwards to.
OLD_PATHS = {
    "errors": ("core.errors",),
    "settings": ("core.settings",),
    "model": ("core.model",),
    "aot": ("runtime.aot", "runtime.cache"),
    "lora": ("train.lora",),
    "checkpoint": ("train.checkpoint",),
    "nnx": ("train.nnx",),
    "coverage": ("cli.coverage",),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> str:
    """The layer of an onnx2jax module: that of the longest name in LAYERS it is or is
    under; an old path's is that of the module it forwards to."""
    name = module.partition(".")[2]  # "" for the package's __init__
    if name in OLD_PATHS:
        return _layer(f"onnx2jax.{OLD_PATHS[name][0]}")
    matches = [
        (len(prefix), layer)
        for layer, prefixes in LAYERS.items()
        for prefix in prefixes
        if name == prefix or (prefix and name.startswith(f"{prefix}."))
    ]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
    return max(matches)[1]


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
        *(ROOT / "tests").rglob("*.py"),
        *(ROOT / "benchmarks").glob("*.py"),
    ]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        if path != PACKAGE / "core" / "model.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, "\n".join(found)


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The checks above can fail: the graph has the edges real imports make, and a cycle
    through a lazy import is found."""
    assert "onnx2jax.runtime.engine" in GRAPH["onnx2jax.core.model"]
    assert "onnx2jax.core.model" not in GRAPH["onnx2jax.runtime.engine"]
    assert "onnx2jax.ops.registry" in GRAPH["onnx2jax.core.convert"]
    assert "onnx2jax.runtime.options" in GRAPH["onnx2jax.train.steps"]
    assert "onnx2jax.core.model" in GRAPH["onnx2jax.model"]
    assert _resolve("onnx2jax.example_path") == "onnx2jax"
    assert ORDER.index(_layer("onnx2jax.core.model")) > ORDER.index(_layer("onnx2jax.runtime.aot"))
    assert _layer("onnx2jax.core.errors") == _layer("onnx2jax.errors") == "core"
    assert _layer("onnx2jax.model") == "model" and _layer("onnx2jax") == "applications"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_paths_only_forward(old):
    """A moved module's old path is a module at the package's top that imports nothing but
    where the module went, and gives the same objects."""
    module = f"onnx2jax.{old}"
    targets = [f"onnx2jax.{target}" for target in OLD_PATHS[old]]
    assert MODULES[module].parent == PACKAGE
    assert GRAPH[module] <= set(targets), f"{module} imports more than {targets}"
    forwarder = importlib.import_module(module)
    forwards_all = "__getattr__" in vars(forwarder)
    for target in map(importlib.import_module, targets):
        for name, value in vars(target).items():
            if not name.startswith("_") and (forwards_all or name in vars(forwarder)):
                assert getattr(forwarder, name) is value, f"{module}.{name}"


def test_old_import_paths_keep_working():
    """The names users and docs import from the old paths are the new modules' objects."""
    from onnx2jax import aot, checkpoint, lora, model, nnx
    from onnx2jax.runtime import aot as runtime_aot
    from onnx2jax.runtime import cache, options
    from onnx2jax.train import checkpoint as train_checkpoint
    from onnx2jax.train import lora as train_lora
    from onnx2jax.train import nnx as train_nnx

    assert aot.export_model is runtime_aot.export_model
    assert aot.load_artifact is runtime_aot.load_artifact
    assert aot.cached_call is runtime_aot.cached_call
    assert aot.ExecutableCache is cache.ExecutableCache and aot.CACHE_ENV == cache.CACHE_ENV
    assert model.inference_compiler_options is options.inference_compiler_options
    assert model.default_compiler_options is options.default_compiler_options
    assert lora.LoRA is train_lora.LoRA and nnx.OnnxModule is train_nnx.OnnxModule
    assert checkpoint.Checkpointer is train_checkpoint.Checkpointer
