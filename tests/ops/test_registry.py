"""The one operator registry: versions given as a tuple, errors that leave nothing behind."""

from __future__ import annotations

import copy

import pytest

from onnx2jax.ops import registry
from onnx2jax.ops.registry import lookup, register

DOMAIN = "com.example.registry-test"


@pytest.fixture(autouse=True)
def private_registry(monkeypatch):
    """Each test registers into a copy: the operator table's test reads the real one."""
    monkeypatch.setattr(registry, "_REGISTRY", copy.deepcopy(registry._REGISTRY))


def test_a_tuple_of_versions_registers_one_function_for_each():
    @register("Twice", since=(1, 5, 9), domain=DOMAIN)
    def twice(ctx, x):
        return x

    assert [lookup(DOMAIN, "Twice", opset) is None for opset in (0, 1, 4)] == [True, False, False]
    assert {lookup(DOMAIN, "Twice", opset).since for opset in (1, 6, 30)} == {1, 5, 9}
    assert lookup(DOMAIN, "Twice", 30).function is twice


@pytest.mark.parametrize("since", [(), (3, 3), 0, (1, "2"), True, (2, -1)])
def test_bad_versions_are_refused_and_register_nothing(since):
    name = f"Bad{abs(hash(str(since)))}"
    with pytest.raises(ValueError):
        register(name, since=since, domain=DOMAIN)(lambda ctx: None)
    assert all(lookup(DOMAIN, name, opset) is None for opset in range(0, 40))


def test_a_version_registered_twice_is_refused_whole():
    register("Once", since=4, domain=DOMAIN)(lambda ctx: None)
    with pytest.raises(ValueError, match="registered twice"):
        register("Once", since=(2, 4), domain=DOMAIN)(lambda ctx: None)
    assert lookup(DOMAIN, "Once", 3) is None  # version 2 was not added either
