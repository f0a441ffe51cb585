"""The ONNX backend test suite (node, simple, pytorch-converted, pytorch-operator, light models).

Every test runs. The ones listed in ``expected_failures.txt`` must fail (each line says why);
an entry that passes is an error, so the list stays true as ops land.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx.backend.test
import pytest

from onnx2jax.backend import Onnx2JaxBackend

EXPECTED_FAILURES_FILE = Path(__file__).with_name("expected_failures.txt")


def _expected_failures() -> dict[str, str]:
    entries = {}
    for line in EXPECTED_FAILURES_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, reason = line.partition(" ")
        entries[name] = reason.strip()
    return entries


def _suite_tests() -> dict[str, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        runner = onnx.backend.test.BackendTest(Onnx2JaxBackend, __name__)
    tests = {}
    for case in runner.test_cases.values():
        for name in dir(case):
            if name.startswith("test_") and name.endswith("_cpu"):
                tests[name] = getattr(case, name)
    return tests


SUITE = _suite_tests()
EXPECTED_FAILURES = _expected_failures()


def test_expected_failures_name_real_tests() -> None:
    unknown = sorted(set(EXPECTED_FAILURES) - set(SUITE))
    assert not unknown, f"expected_failures.txt names tests that do not exist: {unknown}"


@pytest.mark.parametrize("name", sorted(SUITE))
def test_backend(name: str) -> None:
    test = SUITE[name]
    if name in EXPECTED_FAILURES:
        try:
            test(None)
        except Exception:
            return
        pytest.fail(
            f"{name} passes now; remove it from expected_failures.txt "
            f"(it says: {EXPECTED_FAILURES[name]})"
        )
    test(None)
