"""Shared fixtures: models exported once per test session (cached across runs in .pytest_cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.models.exports import export_minilm


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The fast tests first, then those marked slow: the one test command (README, .ci/run)
    reports a plain bug in minutes, before the model exports."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)


def _cached(request: pytest.FixtureRequest, name: str, build) -> Path:
    folder = Path(request.config.cache.mkdir("onnx2jax-models"))
    path = folder / name
    if not path.exists():
        tmp = path.with_suffix(f".partial-{os.getpid()}.onnx")  # parallel workers never clash
        build(tmp)
        tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def minilm_legacy_onnx(request: pytest.FixtureRequest) -> Path:
    """MiniLM (real weights) exported by torch.onnx with the TorchScript exporter, opset 17."""
    return _cached(request, "minilm_legacy.onnx", lambda p: export_minilm(p, dynamo=False))


@pytest.fixture(scope="session")
def minilm_dynamo_onnx(request: pytest.FixtureRequest) -> Path:
    """MiniLM (real weights) exported by torch.onnx with the dynamo exporter (opset 18+)."""
    return _cached(request, "minilm_dynamo.onnx", lambda p: export_minilm(p, dynamo=True))
