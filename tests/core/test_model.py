"""The Model API: loading, inputs, outputs, params, jit/grad/vmap, and the errors a user sees."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core.errors import (
    DataDependentShapeError,
    InputError,
    ModelLoadError,
    UnsupportedOpError,
)


def affine_model(opset: int = 17) -> onnx.ModelProto:
    """y = reshape((x * w + b) , [-1]) with a shape computed from Shape -> Concat (static)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.normal(size=(3,)).astype(np.float32), "b")
    minus_one = numpy_helper.from_array(np.array([-1], np.int64), "minus_one")
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"], name="mul"),
        helper.make_node("Add", ["xw", "b"], ["h"], name="add"),
        helper.make_node("Shape", ["h"], ["h_shape"], name="shape"),
        helper.make_node("Shape", ["h"], ["batch"], name="batch", start=0, end=1),
        helper.make_node("Concat", ["batch", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["h", "target"], ["y"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        initializer=[w, b, minus_one],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def reference(x: np.ndarray, model: onnx2jax.Model) -> np.ndarray:
    w, b = (np.asarray(model.params[k]) for k in ("w", "b"))
    return (x * w + b).reshape(len(x), -1)


def test_load_from_path_bytes_and_proto(tmp_path):
    proto = affine_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = np.ones((2, 2, 3), np.float32)
    for source in (path, str(path), proto.SerializeToString(), proto):
        model = onnx2jax.load(source)
        np.testing.assert_allclose(model(x)["y"], reference(x, model), rtol=1e-6)


def test_params_are_float_initializers_only():
    model = onnx2jax.load(affine_model())
    assert sorted(model.params) == ["b", "w"]
    assert all(isinstance(v, jax.Array) for v in model.params.values())
    assert "minus_one" in model.plan.constants


def test_apply_is_pure_and_jittable():
    model = onnx2jax.load(affine_model())
    x = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    params = {k: v * 2 for k, v in model.params.items()}
    out = jax.jit(model.apply)(params, x)["y"]
    w, b = np.asarray(params["w"]), np.asarray(params["b"])
    np.testing.assert_allclose(out, (x * w + b).reshape(2, -1), rtol=1e-6)


def test_new_batch_size_retraces_instead_of_failing():
    model = onnx2jax.load(affine_model())
    for batch in (1, 3, 5):
        x = np.ones((batch, 2, 3), np.float32)
        assert model(x)["y"].shape == (batch, 6)


def test_shape_arithmetic_is_static_and_params_are_not_constants():
    model = onnx2jax.load(affine_model())
    x = jnp.ones((2, 2, 3), jnp.float32)
    text = jax.jit(model.apply).lower(model.params, x).as_text()
    # The Shape -> Concat subgraph folded away: no shape ops, no constants at all, and the
    # weights arrive as the program's arguments (two params, one input).
    assert "stablehlo.reshape" in text
    assert "stablehlo.constant" not in text
    assert "get_dimension_size" not in text and "concatenate" not in text
    assert "@main(%arg0: tensor<3xf32>, %arg1: tensor<3xf32>, %arg2: tensor<2x2x3xf32>)" in text


def test_intermediate_outputs_by_name():
    model = onnx2jax.load(affine_model())
    x = np.ones((2, 2, 3), np.float32)
    out = model(x, outputs=["xw", "y"])
    assert set(out) == {"xw", "y"}
    np.testing.assert_allclose(out["xw"], x * np.asarray(model.params["w"]), rtol=1e-6)
    assert "xw" in model.tensor_names()


def test_unknown_output_name_is_a_clear_error():
    model = onnx2jax.load(affine_model())
    with pytest.raises(InputError, match="no tensor named 'nope'"):
        model(np.ones((1, 2, 3), np.float32), outputs=["nope"])


def test_grad_matches_finite_differences():
    model = onnx2jax.load(affine_model())
    x = np.random.default_rng(1).normal(size=(2, 2, 3)).astype(np.float32)

    def loss(params):
        return jnp.sum(jnp.tanh(model.apply(params, x)["y"]))

    grads = jax.grad(loss)(model.params)
    eps = 1e-3
    for name, value in model.params.items():
        for i in range(value.size):
            bump = jnp.zeros(value.size).at[i].set(eps).reshape(value.shape)
            plus = loss({**model.params, name: value + bump})
            minus = loss({**model.params, name: value - bump})
            numeric = (plus - minus) / (2 * eps)
            assert abs(float(grads[name].reshape(-1)[i]) - float(numeric)) < 2e-2


def test_vmap_over_a_batch_of_param_sets():
    model = onnx2jax.load(affine_model())
    x = np.ones((1, 2, 3), np.float32)
    stacked = {k: jnp.stack([v, 2 * v]) for k, v in model.params.items()}
    out = jax.vmap(lambda p: model.apply(p, x)["y"])(stacked)
    assert out.shape == (2, 1, 6)


def test_inputs_by_position_and_name_and_errors():
    model = onnx2jax.load(affine_model())
    x = np.ones((1, 2, 3), np.float32)
    np.testing.assert_allclose(model(x=x)["y"], model(x)["y"])
    with pytest.raises(InputError, match="missing input"):
        model()
    with pytest.raises(InputError, match="unknown input 'z'"):
        model(z=x)
    with pytest.raises(InputError, match="expects size 3 on axis 2"):
        model(np.ones((1, 2, 4), np.float32))
    with pytest.raises(InputError, match="expects 3 dims"):
        model(np.ones((2, 3), np.float32))
    with pytest.raises(InputError, match="expects x: float32"):
        model(np.ones((1, 2, 3), np.int32))
    # float64 from NumPy is cast to the declared float32.
    assert model(np.ones((1, 2, 3)))["y"].dtype == jnp.float32


def test_params_mismatch_is_a_clear_error():
    model = onnx2jax.load(affine_model())
    with pytest.raises(InputError, match="missing 1"):
        model.apply({"w": model.params["w"]}, np.ones((1, 2, 3), np.float32))


def test_repr_lists_inputs_outputs_opsets_and_params():
    text = repr(onnx2jax.load(affine_model()))
    assert "x: float32[batch, 2, 3]" in text
    assert "y: float32[batch, 6]" in text
    assert "ai.onnx 17" in text
    assert "2 tensors, 6 values" in text


def test_import_does_not_touch_x64():
    assert jax.config.jax_enable_x64 is False
    model = onnx2jax.load(affine_model())
    model(np.ones((1, 2, 3), np.float32))
    assert jax.config.jax_enable_x64 is False


def test_unsupported_ops_are_all_listed_at_load():
    nodes = [
        helper.make_node("FancyOp", ["x"], ["a"], name="n1", domain="my.domain"),
        helper.make_node("FancyOp", ["a"], ["b"], name="n2", domain="my.domain"),
        helper.make_node("OtherOp", ["b"], ["y"], name="n3", domain="my.domain"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 3)]
    )
    with pytest.raises(UnsupportedOpError) as info:
        onnx2jax.load(proto)
    message = str(info.value)
    assert "my.domain::FancyOp (opset 3), used by 2 node(s): 'n1', 'n2'" in message
    assert "my.domain::OtherOp" in message
    assert len(info.value.missing) == 2


def test_truncated_and_non_onnx_files(tmp_path):
    data = affine_model().SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated.onnx"):
        onnx2jax.load(truncated)
    text = tmp_path / "notes.onnx"
    text.write_text("hello, this is not a model")
    with pytest.raises(ModelLoadError, match="notes.onnx"):
        onnx2jax.load(text)
    with pytest.raises(ModelLoadError, match="not found"):
        onnx2jax.load(tmp_path / "missing.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        onnx2jax.load(empty)


def test_external_data_missing_or_outside_the_folder(tmp_path):
    proto = affine_model()
    path = tmp_path / "ext" / "m.onnx"
    path.parent.mkdir()
    onnx.save(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    model = onnx2jax.load(path)
    x = np.ones((1, 2, 3), np.float32)
    np.testing.assert_allclose(model(x)["y"], reference(x, model))

    (path.parent / "weights.bin").rename(tmp_path / "weights.bin")
    with pytest.raises(ModelLoadError, match="weights.bin.*missing"):
        onnx2jax.load(path)

    escaped = onnx.load(path, load_external_data=False)
    for tensor in escaped.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.bin"
    onnx.save(escaped, path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        onnx2jax.load(path)


def test_data_dependent_shape_raises_under_jit_and_runs_eagerly():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["y"], name="dyn_reshape")]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("s", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = onnx2jax.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.arange(6, dtype=np.float32)
    shape = np.array([2, 3], np.int64)
    with pytest.raises(DataDependentShapeError, match="Reshape node 'dyn_reshape'.*'s'"):
        jax.jit(model.apply)(model.params, x, shape)
    assert model(x, shape)["y"].shape == (2, 3)
    assert model(x, np.array([3, 2], np.int64))["y"].shape == (3, 2)


def nonzero_model() -> onnx.ModelProto:
    """y = (x * w)[x * w != 0] * 3: a data-dependent NonZero between two traced parts."""
    w = numpy_helper.from_array(np.array([1.0, 0.0, 2.0, -1.0, 0.0, 5.0], np.float32), "w")
    axes = numpy_helper.from_array(np.array([0], np.int64), "axes")
    three = numpy_helper.from_array(np.array(3.0, np.float32), "three")
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["a"], name="scale"),
        helper.make_node("NonZero", ["a"], ["nz"], name="nonzero"),
        helper.make_node("Squeeze", ["nz", "axes"], ["idx"], name="squeeze"),
        helper.make_node("Gather", ["a", "idx"], ["g"], name="gather"),
        helper.make_node("Mul", ["g", "three"], ["y"], name="triple"),
    ]
    graph = helper.make_graph(
        nodes,
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[w, axes, three],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_data_dependent_nodes_run_between_jitted_segments():
    model = onnx2jax.load(nonzero_model())
    x = np.array([1, 1, 1, 1, 1, 1], np.float32)
    np.testing.assert_allclose(model(x)["y"], [3, 6, -3, 15])
    runner = model.engine.segmented_runner()
    assert [s.host for s in runner.segments] == [False, True, False]
    compiled = len(runner.compiled_keys())
    # Same count of non-zeros: every segment is reused; another count compiles the tail anew.
    np.testing.assert_allclose(model(2 * x)["y"], [6, 12, -6, 30])
    assert len(runner.compiled_keys()) == compiled
    np.testing.assert_allclose(model(np.array([0, 1, 1, 1, 1, 1], np.float32))["y"], [6, -3, 15])
    assert len(runner.compiled_keys()) == compiled + 1
    with pytest.raises(DataDependentShapeError, match="NonZero node 'nonzero'"):
        jax.jit(model.apply)(model.params, x)


def test_segments_run_the_program_model_call_runs():
    """A CNN whose output feeds a NonZero: its jitted segment gets the pre-transposed Conv
    weights and model(...)'s XLA options (before: ResNet-50 b1 122 ms against 61 without the
    NonZero)."""
    proto = onnx.load(onnx2jax.example_path())
    graph = proto.graph
    graph.node.append(helper.make_node("NonZero", ["logits"], ["positive"], name="nonzero"))
    graph.output.append(helper.make_tensor_value_info("positive", TensorProto.INT64, None))
    model = onnx2jax.load(proto)
    images = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)
    out = model(images)
    logits = np.asarray(
        onnx2jax.load(onnx2jax.example_path()).apply(model.params, images)["logits"]
    )
    np.testing.assert_allclose(np.asarray(out["logits"]), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["positive"]), np.stack(np.nonzero(logits)))
    runner = model.engine.segmented_runner()
    assert [s.host for s in runner.segments] == [False, True]
    options = model.inference_function(model.bind_inputs((images,), {}))[1]
    assert [key[-1] for key in runner.compiled_keys()] == [tuple(sorted(options.items()))]


def test_segments_return_intermediate_outputs():
    model = onnx2jax.load(nonzero_model())
    x = np.ones(6, np.float32)
    out = model(x, outputs=["a", "y"])
    np.testing.assert_allclose(out["a"], np.asarray(model.params["w"]))
    assert out["y"].shape == (4,)


def test_backend_run_node():
    from onnx2jax.backend import Onnx2JaxBackend

    node = helper.make_node("Add", ["a", "b"], ["c"])
    (out,) = Onnx2JaxBackend.run_node(node, [np.ones(2, np.float32), np.full(2, 2, np.float32)])
    np.testing.assert_array_equal(out, [3.0, 3.0])
    (out,) = Onnx2JaxBackend.run_node(
        helper.make_node("Relu", ["x"], ["y"]), {"x": np.array([-1.0, 2.0], np.float32)}
    )
    np.testing.assert_array_equal(out, [0.0, 2.0])


def test_few_rows_choose_ynnpack_dots_and_many_rows_do_not():
    from onnx2jax.core.model import inference_compiler_options

    off = {"xla_cpu_experimental_ynn_fusion_type": ""}
    few = inference_compiler_options({"ids": np.zeros((1, 128), np.int64)}, off)
    many = inference_compiler_options({"ids": np.zeros((32, 128), np.int64)}, off)
    assert few == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert many == off
    # With XLA's defaults (ONNX2JAX_TUNE_XLA=0, or not on CPU) nothing is chosen.
    assert inference_compiler_options({"ids": np.zeros((1, 128), np.int64)}, {}) == {}
    model = onnx2jax.load(affine_model())
    x = np.ones((1, 2, 3), np.float32)
    np.testing.assert_allclose(model(x)["y"], model.apply(model.params, x)["y"], rtol=1e-6)


def products_model() -> onnx.ModelProto:
    """y = Einsum(Gemm(MatMul(x, w1), w2, c), w3): one of each matrix product."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)
        for name, shape in [("w1", (16, 32)), ("w2", (32, 8)), ("c", (8,)), ("w3", (8, 4))]
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"], name="matmul"),
        helper.make_node("Gemm", ["h1", "w2", "c"], ["h2"], name="gemm"),
        helper.make_node("Einsum", ["h2", "w3"], ["y"], name="einsum", equation="nk,kj->nj"),
    ]
    graph = helper.make_graph(
        nodes,
        "products",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bfloat16_precision_rounds_product_operands_and_keeps_float32_results():
    proto = products_model()
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    exact = onnx2jax.load(proto)
    fast = onnx2jax.load(proto, precision="bfloat16")
    assert (exact.precision, fast.precision) == ("float32", "bfloat16")
    y_exact, y_fast = (np.asarray(m(x)["y"]) for m in (exact, fast))
    assert y_fast.dtype == np.float32
    # bfloat16 keeps 8 significant bits: close to float32, but not the same numbers.
    np.testing.assert_allclose(y_fast, y_exact, rtol=0.05, atol=0.05 * np.abs(y_exact).max())
    assert not np.array_equal(y_fast, y_exact)
    # The rounding is the whole difference: the products of bfloat16-rounded operands.
    w1, w2, c, w3 = (np.asarray(fast.params[k], np.float32) for k in ("w1", "w2", "c", "w3"))
    bf16 = lambda v: np.asarray(jnp.asarray(v).astype(jnp.bfloat16), np.float32)  # noqa: E731
    expected = bf16(bf16(bf16(x) @ bf16(w1)) @ bf16(w2) + c) @ bf16(w3)
    np.testing.assert_allclose(y_fast, expected, rtol=1e-4, atol=1e-4)
    jaxpr = str(jax.make_jaxpr(fast.apply)(fast.params, x))
    assert jaxpr.count("preferred_element_type=float32") == 3 and "bf16" in jaxpr
    assert "bf16" not in str(jax.make_jaxpr(exact.apply)(exact.params, x))


def test_bfloat16_precision_trains_and_rejects_unknown_policies():
    model = onnx2jax.load(products_model(), precision="bfloat16")
    x = np.ones((2, 16), np.float32)
    grads = jax.grad(lambda p: jnp.sum(model.apply(p, x)["y"] ** 2))(model.params)
    assert all(g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
    assert float(jnp.abs(grads["w1"]).sum()) > 0
    with pytest.raises(ValueError, match="precision must be one of 'float32', 'bfloat16'"):
        onnx2jax.load(products_model(), precision="float16")


def mixed_outputs_model(data_dependent: bool) -> onnx.ModelProto:
    """Outputs in no sorted order: a late node's, a graph input, a static Shape, a float param,
    an integer constant, an early node's, a name declared twice (and a NonZero's, whose
    data-dependent shape sends model(...) through the segmented runner)."""
    nodes = [
        helper.make_node("Add", ["x", "w"], ["early"]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Neg", ["early"], ["mid"]),
        helper.make_node("Relu", ["mid"], ["late"]),
    ]
    names = ["late", "x", "shape", "w", "k", "early", "late"]
    if data_dependent:
        nodes.append(helper.make_node("NonZero", ["mid"], ["nz"]))
        names.insert(2, "nz")
    graph = helper.make_graph(
        nodes,
        "mixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_value_info(n, onnx.TypeProto()) for n in names],
        initializer=[
            numpy_helper.from_array(np.array([1, -1, 2, -3], np.float32), "w"),
            numpy_helper.from_array(np.arange(3, dtype=np.int64), "k"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.mark.parametrize("data_dependent", [False, True])
def test_outputs_keep_the_declared_order(tmp_path, data_dependent):
    import onnxruntime

    proto = mixed_outputs_model(data_dependent)
    declared = [v.name for v in proto.graph.output]
    x = np.array([0.5, 2.0, -4.0, 1.0], np.float32)
    session = onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    expected = dict(zip(declared, session.run(None, {"x": x}), strict=True))
    model = onnx2jax.load(proto)
    assert model.output_names == list(dict.fromkeys(declared))
    runs = {
        "call": lambda: model(x),
        "apply": lambda: model.apply(model.params, x),
        "cached": lambda: onnx2jax.load(proto, cache_dir=tmp_path)(x),
    }
    if not data_dependent:
        runs["jit(apply)"] = lambda: jax.jit(model.apply)(model.params, x)
    for how, run in runs.items():
        out = run()
        assert list(out) == model.output_names, how
        for name, value in zip(model.output_names, out.values(), strict=True):
            np.testing.assert_array_equal(np.asarray(value), expected[name], err_msg=how)
    asked = ["shape", "late", "x", "early", "k"]
    assert list(model(x, outputs=asked)) == asked
    assert (
        list(
            jax.jit(model.apply, static_argnames="outputs")(
                model.params, x, outputs=tuple(asked[::-1])
            )
        )
        == asked[::-1]
    )
