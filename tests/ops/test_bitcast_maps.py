"""BitCast beyond the node suite (bool, complex, sub-byte and float8 types, constants, x64 off)
and the ai.onnx.ml map ops CastMap and DictVectorizer against onnxruntime; skl2onnx
classifiers' ZipMap outputs, com.microsoft Tokenizer and skl2onnx text pipelines.

Maps are Python dicts. The map tests drive the interpreter directly, because ``Model`` turns
every input into a JAX array and a dict is not one.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx2jax
from onnx2jax.core.convert import Interpreter
from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.core.errors import OpError
from onnx2jax.core.graph import plan_graph
from tests.helpers import run_onnx2jax, single_node_model

RNG = np.random.default_rng(0)
ML = "ai.onnx.ml"


def _bits(dtype, mask=0xFF):
    raw = RNG.integers(0, 256, size=(2, 3, np.dtype(dtype).itemsize), dtype=np.uint8) & mask
    return raw.view(dtype).reshape(2, 3)


@pytest.mark.parametrize(
    "x, to",
    [
        (_bits(np.complex64), TensorProto.UINT64),
        (_bits(np.uint64), TensorProto.COMPLEX64),
        (_bits(np.float64), TensorProto.COMPLEX64),
        (_bits(np.uint8), TensorProto.BOOL),
        (_bits(np.bool_, mask=1), TensorProto.INT8),
        (_bits(ml_dtypes.int4, mask=0xF), TensorProto.UINT4),
        (_bits(ml_dtypes.uint4, mask=0xF), TensorProto.FLOAT4E2M1),
        (_bits(ml_dtypes.int2, mask=0x3), TensorProto.UINT2),
        (_bits(np.float16), TensorProto.BFLOAT16),
        (_bits(np.uint8), TensorProto.FLOAT8E4M3FN),
        (_bits(ml_dtypes.float8_e8m0fnu), TensorProto.INT8),
        (_bits(np.int32), TensorProto.INT32),
    ],
    ids=lambda v: getattr(getattr(v, "dtype", None), "name", str(v)),
)
def test_bitcast_keeps_the_bits(x, to):
    model = single_node_model("BitCast", {"x": x}, opset=26, to=to)
    want = x.view(numpy_dtype(to))
    for jit in (True, False):
        (got,) = run_onnx2jax(model, {"x": x}, jit=jit)
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.dtype == np.bool_:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_bitcast_of_a_constant_folds_exactly():
    x = np.array([1.0, -2.5, np.inf], np.float64)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["x"], value=numpy_helper.from_array(x)),
            helper.make_node("BitCast", ["x"], ["bits"], to=TensorProto.INT64),
            helper.make_node("Shape", ["bits"], ["y"]),
        ],
        "folded",
        [],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 26)], ir_version=10)
    for x64 in (True, False):
        np.testing.assert_array_equal(run_onnx2jax(model, {}, x64=x64)[0], [3])


def test_bitcast_x64_off():
    x = np.array([1.0, -0.0, np.nan], np.float32)
    model = single_node_model("BitCast", {"x": x}, opset=26, to=TensorProto.INT32)
    np.testing.assert_array_equal(run_onnx2jax(model, {"x": x}, x64=False)[0], x.view(np.int32))
    wide = single_node_model("BitCast", {"x": x.astype(np.float64)}, opset=26, to=TensorProto.INT64)
    with pytest.raises(OpError, match="x64"):
        run_onnx2jax(wide, {"x": x.astype(np.float64)}, x64=False)


def test_bitcast_width_mismatch_raises():
    x = np.zeros(3, np.float32)
    model = single_node_model("BitCast", {"x": x}, opset=26, to=TensorProto.INT64)
    with pytest.raises(OpError, match="same width"):
        run_onnx2jax(model, {"x": x})


# ---------------------------------------------------------------------------- maps


def _map_model(op, key_type, value_type, out_type, **attrs):
    map_type = onnx.TypeProto()
    map_type.map_type.key_type = key_type
    map_type.map_type.value_type.tensor_type.elem_type = value_type
    graph = helper.make_graph(
        [helper.make_node(op, ["x"], ["y"], domain=ML, **attrs)],
        "map",
        [helper.make_value_info("x", map_type)],
        [helper.make_tensor_value_info("y", out_type, None)],
    )
    return helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ML, 1)],
    )


def _run_map(model, mapping, jit=False):
    opsets = {o.domain: o.version for o in model.opset_import}
    plan = plan_graph(model.graph, opsets, None)
    interpreter = Interpreter(opsets)
    outputs = [o.name for o in model.graph.output]

    def run(x):
        return interpreter.run(plan, {"x": x}, outputs)

    return [np.asarray(v) for v in (jax.jit(run) if jit else run)(mapping)]


def _onnxruntime(model, mapping):
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    return session.run(None, {"x": mapping})


S, I, F = TensorProto.STRING, TensorProto.INT64, TensorProto.FLOAT


@pytest.mark.parametrize(
    "model, mapping",
    [
        (
            _map_model("DictVectorizer", S, F, F, string_vocabulary=["a", "c", "b", "z"]),
            {"a": 4.0, "c": 8.5, "unknown": 1.0},
        ),
        (_map_model("DictVectorizer", I, F, F, int64_vocabulary=[5, 3, 1]), {1: 2.5, 3: -1.0}),
        (_map_model("CastMap", I, F, F), {3: 1.5, 0: 2.5, 1: 7.0}),
        (_map_model("CastMap", I, F, I, cast_to="TO_INT64"), {3: 1.5, 0: -2.7, 1: 7.0}),
        (_map_model("CastMap", I, F, S, cast_to="TO_STRING"), {3: 1 / 3, 0: 1e20, 1: -7.0}),
        (_map_model("CastMap", I, F, F, map_form="SPARSE", max_map=6), {3: 1.5, 0: 2.5, 1: 7.0}),
        (
            _map_model("CastMap", I, F, I, map_form="SPARSE", max_map=2, cast_to="TO_INT64"),
            {3: 1.5, 0: 2.5, 1: 7.0},
        ),
        (
            _map_model("CastMap", I, F, S, map_form="SPARSE", max_map=4, cast_to="TO_STRING"),
            {3: 1.5, 0: 2.5},
        ),
    ],
    ids=lambda v: v.graph.node[0].op_type if isinstance(v, onnx.ModelProto) else None,
)
def test_maps_match_onnxruntime(model, mapping):
    (want,) = _onnxruntime(model, mapping)
    (got,) = _run_map(model, mapping)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if want.dtype != object:
        with jax.enable_x64(True):
            np.testing.assert_array_equal(_run_map(model, mapping, jit=True)[0], want)


@pytest.mark.parametrize(
    "model, mapping, want",
    [
        # onnxruntime's Python binding feeds only maps of floats, so these follow the spec.
        (
            _map_model("DictVectorizer", I, S, S, int64_vocabulary=[5, 3, 1]),
            {1: "x", 5: "y"},
            [["y", "", "x"]],
        ),
        (_map_model("DictVectorizer", S, I, I, string_vocabulary=["a", "b"]), {"b": 7}, [[0, 7]]),
        (
            _map_model(
                "DictVectorizer",
                S,
                TensorProto.DOUBLE,
                TensorProto.DOUBLE,
                string_vocabulary=["a", "b"],
            ),
            {"b": 0.1},
            [[0, 0.1]],
        ),
        (_map_model("CastMap", I, S, F), {3: "1.5", 0: "2"}, [[2.0, 1.5]]),
        (_map_model("CastMap", I, S, I, cast_to="TO_INT64"), {3: "15", 0: "2.7"}, [[2, 15]]),
        (_map_model("CastMap", I, S, S, cast_to="TO_STRING"), {3: "a", 0: "b"}, [["b", "a"]]),
    ],
    ids=lambda v: v.graph.node[0].op_type if isinstance(v, onnx.ModelProto) else None,
)
def test_maps_of_other_types(model, mapping, want):
    (got,) = _run_map(model, mapping)
    want = np.asarray(want, dtype=got.dtype if got.dtype == object else None)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == numpy_dtype(model.graph.output[0].type.tensor_type.elem_type)


@pytest.mark.parametrize(
    "model, mapping, match",
    [
        (
            _map_model("DictVectorizer", S, F, F, string_vocabulary=["a"]),
            {1: 1.0},
            "does not match",
        ),
        (_map_model("CastMap", I, F, F, map_form="SPARSE", max_map=3), {-1: 1.0}, "negative"),
        (_map_model("CastMap", I, F, F, cast_to="TO_BYTES"), {1: 1.0}, "cast_to"),
        (_map_model("CastMap", I, S, F), {1: "one"}, "not a number"),
    ],
)
def test_map_errors(model, mapping, match):
    with pytest.raises(OpError, match=match):
        _run_map(model, mapping)


def test_skl2onnx_dict_vectorizer_pipeline():
    pytest.importorskip("skl2onnx")
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import DictionaryType, FloatTensorType, StringTensorType
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    data = [{"a": 1.0, "b": 2.0}, {"b": 3.0, "c": -1.0}, {"a": 0.5, "c": 2.0}]
    pipeline = make_pipeline(DictVectorizer(sparse=False), LogisticRegression())
    pipeline.fit(data, [0, 1, 0])
    map_type = DictionaryType(StringTensorType([1]), FloatTensorType([1]))
    model = convert_sklearn(
        pipeline, initial_types=[("x", map_type)], options={LogisticRegression: {"zipmap": False}}
    )
    mapping = {"a": 1.0, "c": 2.0}
    for got, want in zip(_run_map(model, mapping), _onnxruntime(model, mapping), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def _assert_same_python_values(got, want):
    """Equal structure, with the Python types onnxruntime gives (lists, dicts, int/str keys,
    float values); tensors compared as arrays."""
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            _assert_same_python_values(g, w)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want)
        for key, value in want.items():
            assert [type(k) for k in got if k == key] == [type(key)]
            assert type(got[key]) is type(value), (key, type(got[key]), type(value))
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7)
    else:
        want = np.asarray(want)
        got = np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["logistic", "forest"])
def test_skl2onnx_zipmap_outputs_have_onnxruntime_python_types(kind):
    pytest.importorskip("skl2onnx")
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression

    x = RNG.normal(size=(40, 4)).astype(np.float32)
    classes = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5)
    if kind == "logistic":
        classifier = LogisticRegression(max_iter=500).fit(x, classes)  # int64 labels
    else:
        classifier = RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0).fit(
            x, np.array(["low", "mid", "high"])[classes]
        )  # string labels
    proto = convert_sklearn(
        classifier, initial_types=[("X", FloatTensorType([None, 4]))], target_opset={"": 17, ML: 3}
    )
    want = _onnxruntime_session(proto).run(None, {"X": x[:5]})
    with jax.enable_x64(True):  # int64 labels stay int64
        model = onnx2jax.load(proto)
        got = model(X=x[:5])
    assert list(got) == model.output_names == ["output_label", "output_probability"]
    for name, expected in zip(model.output_names, want, strict=True):
        _assert_same_python_values(got[name], expected)


def _onnxruntime_session(proto):
    return onnxruntime.InferenceSession(
        proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )


def _tokenizer_model(**attributes):
    node = helper.make_node(
        "Tokenizer",
        ["x"],
        ["y"],
        domain="com.microsoft",
        **{"mark": 0, "mincharnum": 1, "pad_value": "#", **attributes},
    )
    graph = helper.make_graph(
        [node],
        "tokenizer",
        [helper.make_tensor_value_info("x", TensorProto.STRING, None)],
        [helper.make_tensor_value_info("y", TensorProto.STRING, None)],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
        ir_version=10,
    )


_TEXTS = [
    np.array([["Hello, world! a bb", "x-y  zz"], ["", "\u00e9 caf\u00e9 \u00f1"]], dtype=object),
    np.array(["abcab ab", "a\nb c"], dtype=object),
    np.array(["", ""], dtype=object),
    np.array(["aXXbXc"], dtype=object),
]


@pytest.mark.parametrize(
    "attributes",
    [
        {"tokenexp": "[a-zA-Z0-9_]+"},
        {"tokenexp": "[a-zA-Z0-9_]+", "mincharnum": 2},
        {"tokenexp": r"\w+", "mark": 1},  # RE2's \w is ASCII: "caf\u00e9" gives "caf"
        {"tokenexp": "a|ab|abc"},  # leftmost-longest, not leftmost-first
        {"tokenexp": r"\w+?"},
        {"tokenexp": "x*"},  # empty matches are no tokens
        {"tokenexp": ".", "mark": 1},  # characters
        {"separators": [""]},  # characters
        {"separators": [" ", ","], "mark": 1},
        {"separators": [r"\s+", "[,!]"], "mincharnum": 2},  # one after the other
        {"separators": ["X", "XX"]},
        {"separators": ["x*"]},
    ],
    ids=str,
)
def test_tokenizer_matches_onnxruntime(attributes):
    model = _tokenizer_model(**attributes)
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    compiled = onnx2jax.load(model)
    for text in _TEXTS:
        want = session.run(None, {"x": text})[0]
        got = compiled(x=text)["y"]
        assert got.shape == want.shape and got.tolist() == want.tolist(), (text, got, want)


def test_tokenizer_tokenexpsplit_splits_like_a_separator():
    # onnxruntime's Tokenizer schema has no tokenexpsplit (mlprodict's Python runtime adds it:
    # split at the matches): compare with the expression given as the one separator.
    split = onnx2jax.load(_tokenizer_model(tokenexp="[ ,!-]+", tokenexpsplit=1, mincharnum=2))
    separator = _tokenizer_model(separators=["[ ,!-]+"], mincharnum=2)
    session = onnxruntime.InferenceSession(
        separator.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    for text in _TEXTS:
        assert split(x=text)["y"].tolist() == session.run(None, {"x": text})[0].tolist()


@pytest.mark.parametrize(
    "attributes, match",
    [
        ({"tokenexp": "("}, "invalid tokenexp"),
        ({}, "separators or a non-empty tokenexp"),
        ({"separators": [""], "mincharnum": 2}, "too big for character"),
    ],
)
def test_tokenizer_errors(attributes, match):
    with pytest.raises(OpError, match=match):
        onnx2jax.load(_tokenizer_model(**attributes))(x=np.array(["a b"], dtype=object))


@pytest.mark.parametrize(
    "options",
    [
        {},  # tokenexp "[a-zA-Z0-9_]+", skl2onnx's stand-in for scikit-learn's default
        {"tokenexp": "[a-z]+"},
        {"separators": [r"\s+", "[,.!:']"]},
    ],
    ids=str,
)
def test_skl2onnx_tfidf_pipeline_matches_onnxruntime(options):
    pytest.importorskip("skl2onnx")
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    docs = [
        "the cat sat on the mat",
        "dogs bark, cats meow!",
        "A dog and a cat",
        "the mat is red",
        "Bark bark: the dog's mat",
        "cats, dogs and mats",
    ]
    pipeline = make_pipeline(TfidfVectorizer(ngram_range=(1, 2)), LogisticRegression())
    pipeline.fit(docs, [0, 1, 1, 0, 1, 0])
    # onnxruntime's StringNormalizer needs an installed locale; C.UTF-8 always is.
    proto = convert_sklearn(
        pipeline,
        initial_types=[("text", StringTensorType([None, 1]))],
        options={TfidfVectorizer: {"locale": "C.UTF-8", **options}},
        target_opset={"": 17, ML: 3},
    )
    assert "Tokenizer" in [node.op_type for node in proto.graph.node]
    text = np.array(docs + ["unknown words only", "The the THE cat", ""], dtype=object).reshape(
        -1, 1
    )
    want = _onnxruntime_session(proto).run(None, {"text": text})
    with jax.enable_x64(True):
        got = onnx2jax.load(proto)(text=text)
    for name, expected in zip(["output_label", "output_probability"], want, strict=True):
        _assert_same_python_values(got[name], expected)


def test_tokenizer_without_the_regex_package(monkeypatch):
    # Python's re matches leftmost-first: fine for patterns without alternatives or lazy
    # quantifiers, a clear error for the others.
    import onnx2jax.ops.string as string_ops

    monkeypatch.setattr(string_ops, "_posix_re", None)
    text = np.array(["Hello, world! a bb"], dtype=object)
    got = onnx2jax.load(_tokenizer_model(tokenexp="[a-z]+"))(x=text)["y"]
    assert got.tolist() == [["ello", "world", "a", "bb"]]
    with pytest.raises(OpError, match="needs the `regex` package"):
        onnx2jax.load(_tokenizer_model(tokenexp="a|ab"))(x=text)
