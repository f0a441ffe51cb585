"""model(...)'s per-call path: a repeated signature goes straight to its program, and still sees
changed params, options and settings, checks its inputs and never hashes the params."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import onnx2jax
from onnx2jax.core import settings
from onnx2jax.core.errors import InputError
from onnx2jax.runtime import engine as engine_module
from onnx2jax.runtime.cache import ExecutableCache
from onnx2jax.runtime.engine import Engine, ReadyCall, ready_key
from tests.core.test_model import affine_model, reference


def expected(model: onnx2jax.Model, x: np.ndarray) -> np.ndarray:
    return reference(np.asarray(x, np.float32), model)


X = np.random.default_rng(1).standard_normal((2, 2, 3)).astype(np.float32)


def call(model: onnx2jax.Model, x: np.ndarray = X) -> np.ndarray:
    return np.asarray(model(x)["y"])


def test_assigned_params_are_seen_on_the_next_call():
    model = onnx2jax.load(affine_model())
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    call(model)  # the signature's program is ready now
    model.params = {k: v * 2 for k, v in model.params.items()}
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)


def test_params_changed_in_place_are_seen_on_the_next_call():
    model = onnx2jax.load(affine_model())
    call(model), call(model)
    original = model.params["w"]
    model.params["w"] = original * -1.0
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    model.params["w"] = original  # an array seen before, back again
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)


def test_params_swapped_between_names_are_seen():
    """w and b have one shape: the same arrays in the same order under swapped names."""
    model = onnx2jax.load(affine_model())
    call(model), call(model)
    w, b = model.params["w"], model.params["b"]
    model.params = {"b": w, "w": b} if list(model.params) == ["w", "b"] else {"w": b, "b": w}
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)


def test_a_ready_call_is_current_only_for_the_same_arrays_names_and_options():
    a, b = jnp.zeros(3), jnp.ones(3)
    ready = ReadyCall(None, {}, [], cache=None, source={"a": a, "b": b}, options={"o": 1})
    assert ready.current({"a": a, "b": b}, {"o": 1})
    assert not ready.current({"a": a, "b": jnp.ones(3)}, {"o": 1})
    assert not ready.current({"b": a, "a": b}, {"o": 1})  # the same arrays under other names
    assert not ready.current({"a": a}, {"o": 1})
    assert not ready.current({"a": a, "b": b}, {"o": 2})


def test_input_errors_are_the_same_after_the_program_is_ready():
    model = onnx2jax.load(affine_model())
    call(model), call(model)
    with pytest.raises(InputError, match="expects 3 dims"):
        model(np.zeros((2, 2), np.float32))
    with pytest.raises(InputError, match="expects size 2 on axis 1"):
        model(np.zeros((2, 3, 3), np.float32))
    with pytest.raises(InputError, match="expects x: float32"):
        model(np.zeros((2, 2, 3), np.int32))
    with pytest.raises(InputError, match="missing input"):
        model()
    with pytest.raises(InputError, match="unknown input 'z'"):
        model(X, z=X)
    with pytest.raises(InputError, match="both by position and by name"):
        model(X, x=X)
    # A float64 input is cast within its kind, as before.
    np.testing.assert_allclose(
        call(model, X.astype(np.float64)), expected(model, X), rtol=1e-5, atol=1e-5
    )


def test_a_repeated_call_neither_chooses_again_nor_hashes_params(monkeypatch):
    model = onnx2jax.load(affine_model())
    call(model)
    counts = {"signature_key": 0, "inference_function": 0, "prepared_params": 0}

    def counting(name, function):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        engine_module, "signature_key", counting("signature_key", engine_module.signature_key)
    )
    for method in ("inference_function", "prepared_params"):
        monkeypatch.setattr(Engine, method, counting(method, getattr(Engine, method)))
    for _ in range(3):
        np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    assert counts == {"signature_key": 0, "inference_function": 0, "prepared_params": 0}
    # A new signature chooses its program once.
    call(model, X[:1]), call(model, X[:1])
    assert counts["inference_function"] == 1


def test_cached_calls_hash_params_once_per_signature(tmp_path, monkeypatch):
    model = onnx2jax.load(affine_model(), cache_dir=tmp_path)
    hashed = []
    original = engine_module.signature_key
    monkeypatch.setattr(
        engine_module, "signature_key", lambda tree: hashed.append(1) or original(tree)
    )
    for _ in range(3):
        np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    once = len(hashed)
    assert once > 0
    for _ in range(3):
        call(model)
    assert len(hashed) == once
    assert (model.engine.cache.hits, model.engine.cache.misses) == (0, 1)
    # Another batch size is another entry; a changed param is seen through the executable.
    call(model, X[:1])
    assert model.engine.cache.misses == 2
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".jaxexec"]) == 2
    model.params["b"] = model.params["b"] + 1.0
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    assert model.engine.cache.misses == 2  # params are arguments: the same executable


def test_changed_compiler_options_choose_again(monkeypatch):
    model = onnx2jax.load(affine_model())
    call(model), call(model)
    chosen = counted_choices(monkeypatch)
    model.compiler_options = {**model.compiler_options, "xla_cpu_enable_fast_math": False}
    call(model)
    assert len(chosen) == 1
    model.compiler_options["xla_cpu_enable_fast_math"] = True  # changed in place
    call(model)
    assert len(chosen) == 2
    call(model)
    assert len(chosen) == 2


def test_ready_keys_tell_signatures_and_settings_apart(monkeypatch):
    x = np.zeros((2, 2, 3), np.float32)
    key = ready_key({"x": x}, None)
    assert key == ready_key({"x": np.ones((2, 2, 3), np.float32)}, None)
    assert key != ready_key({"x": np.zeros((3, 2, 3), np.float32)}, None)
    assert key != ready_key({"x": np.zeros((2, 2, 3), np.float16)}, None)
    assert key != ready_key({"x": jnp.asarray(x)}, None)
    assert key != ready_key({"x": x}, ("y",))
    assert ready_key({"x": [x]}, None) is None
    monkeypatch.setenv("ONNX2JAX_NATIVE", "0")
    assert key != ready_key({"x": x}, None)
    monkeypatch.delenv("ONNX2JAX_NATIVE")
    traced = []
    jax.jit(lambda v: traced.append(ready_key({"x": v}, None)) or v)(x)
    assert traced == [None]


def test_model_under_the_users_transformations_after_plain_calls():
    model = onnx2jax.load(affine_model())
    call(model), call(model)
    batched = jax.vmap(lambda x: model(x[None])["y"][0])(X)
    np.testing.assert_allclose(np.asarray(batched), expected(model, X), rtol=1e-5, atol=1e-5)
    under_jit = jax.jit(lambda x: model(x)["y"])(X)
    np.testing.assert_allclose(np.asarray(under_jit), expected(model, X), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda x: model(x)["y"].sum())(jnp.asarray(X))
    assert grads.shape == X.shape


def test_a_cache_given_to_the_engine_later_is_used(tmp_path):
    model = onnx2jax.load(affine_model())
    call(model), call(model)
    model.engine.cache = ExecutableCache(tmp_path)
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    call(model)
    assert (model.engine.cache.hits, model.engine.cache.misses) == (0, 1)
    model.engine.cache = None
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)


def counted_choices(monkeypatch) -> list[int]:
    chosen: list[int] = []
    original = Engine.inference_function
    monkeypatch.setattr(
        Engine, "inference_function", lambda self, bound: chosen.append(1) or original(self, bound)
    )
    return chosen


def test_native_setting_toggled_between_calls_chooses_again(monkeypatch):
    model = onnx2jax.load(affine_model())
    monkeypatch.delenv("ONNX2JAX_NATIVE", raising=False)
    call(model), call(model)
    chosen = counted_choices(monkeypatch)
    monkeypatch.setenv("ONNX2JAX_NATIVE", "0")
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    assert len(chosen) == 1
    monkeypatch.delenv("ONNX2JAX_NATIVE")
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    call(model)
    assert len(chosen) == 1  # the first program is still ready for its settings


def test_split_setting_is_read_only_for_inputs_of_many_rows(monkeypatch):
    """Few rows never split over devices, so their program does not depend on the setting;
    many rows see it toggled between calls."""
    model = onnx2jax.load(affine_model())
    monkeypatch.delenv("ONNX2JAX_SPLIT_BATCH", raising=False)
    many = np.random.default_rng(2).standard_normal((2048, 2, 3)).astype(np.float32)
    call(model), call(model, many)
    few_ready = model.engine._ready[ready_key({"x": X}, None)]
    many_ready = model.engine._ready[ready_key({"x": many}, None)]
    assert few_ready.settings == ()
    assert many_ready.settings == ((settings.split_batch, True),)
    chosen = counted_choices(monkeypatch)
    monkeypatch.setenv("ONNX2JAX_SPLIT_BATCH", "0")
    np.testing.assert_allclose(call(model), expected(model, X), rtol=1e-5, atol=1e-5)
    assert len(chosen) == 0
    np.testing.assert_allclose(call(model, many), expected(model, many), rtol=1e-5, atol=1e-5)
    assert len(chosen) == 1
    call(model, many)
    assert len(chosen) == 1


def test_a_ready_call_is_not_current_once_a_setting_it_read_changed():
    values = {"split": True}
    ready = ReadyCall(
        None, {}, [], cache=None, source={}, options={}, settings={lambda: values["split"]: True}
    )
    assert ready.current({}, {})
    values["split"] = False
    assert not ready.current({}, {})


def test_inputs_by_position_and_by_name_bind_alike():
    model = onnx2jax.load(affine_model())
    by_position = model.bind_inputs((X,), {})
    by_name = model.bind_inputs((), {"x": X})
    assert list(by_position) == list(by_name) == model.input_names
    np.testing.assert_array_equal(by_position["x"], by_name["x"])
    assert model.bind_inputs((X.astype(np.float64),), {})["x"].dtype == np.float32
    with pytest.raises(InputError, match="expects 3 dims"):
        model.bind_inputs((X[0],), {})
