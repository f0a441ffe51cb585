"""The ai.onnx.ml domain (scikit-learn exports through skl2onnx).

Numeric ops trace; anything reading or producing strings needs static (or eager) values, since
strings cannot live in JAX arrays. Tree ensembles are evaluated for every sample and tree at
once: a fixed number of gather steps (the deepest tree's depth) walks all of them together.
Where the ONNX spec is vague (binary classifiers), the results follow onnxruntime.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from onnx2jax.core.convert import is_static
from onnx2jax.core.dtypes import numpy_dtype
from onnx2jax.ops.cast import parse_int
from onnx2jax.ops.registry import ML, register

_POST_TRANSFORMS = ("NONE", "SOFTMAX", "LOGISTIC", "SOFTMAX_ZERO", "PROBIT")


def _post_transform(ctx, xp, scores, mode):
    if mode == "NONE":
        return scores
    if mode == "LOGISTIC":
        return 1 / (1 + xp.exp(-scores))
    if mode == "SOFTMAX":
        shifted = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)
    if mode == "SOFTMAX_ZERO":
        # Exact zeros stay zero (they mean "no score"); an all-zero row becomes 0.5s.
        nonzero = xp.abs(scores) > 1e-7
        exps = xp.where(nonzero, xp.exp(scores - scores.max(axis=-1, keepdims=True)), 0)
        total = exps.sum(axis=-1, keepdims=True)
        return xp.where(total == 0, xp.full_like(exps, 0.5), exps / xp.where(total == 0, 1, total))
    if mode == "PROBIT":
        erfinv = jax.scipy.special.erfinv
        return np.sqrt(2).astype(scores.dtype) * erfinv(2 * jnp.asarray(scores) - 1)
    raise ctx.error(f"unknown post_transform {mode!r}")


def _float_input(x):
    """ML ops compute in float32 unless the input is double; integer inputs become float32."""
    if x.dtype == np.float64:
        return x
    return x.astype(np.float32)


def _class_labels(ctx, int_attr="classlabels_int64s", str_attr="classlabels_strings"):
    labels = ctx.attr(int_attr)
    if labels:
        return np.asarray(labels, dtype=np.int64)
    labels = ctx.attr(str_attr)
    if labels:
        return np.asarray(labels, dtype=object)
    raise ctx.error(f"needs {int_attr} or {str_attr}")


def _pick_labels(ctx, labels, index):
    """``labels[index]``; string labels need the winning indices at trace time."""
    if labels.dtype == object:
        return labels[ctx.static(index, None, "the predicted class indices (string labels)")]
    if isinstance(index, np.ndarray):
        return labels[index]
    return jnp.asarray(labels)[index]


@register("LinearRegressor", since=1, domain=ML)
def linear_regressor(ctx, x):
    xp = ctx.xp(x)
    x = _float_input(x)
    targets = ctx.attr("targets", 1)
    coefficients = np.asarray(ctx.attr("coefficients"), x.dtype).reshape(targets, -1)
    scores = x.reshape(x.shape[0], -1) @ coefficients.T
    intercepts = ctx.attr("intercepts")
    if intercepts:
        scores = scores + np.asarray(intercepts, x.dtype)
    return _post_transform(ctx, xp, scores, ctx.attr("post_transform", "NONE")).astype(np.float32)


@register("LinearClassifier", since=1, domain=ML)
def linear_classifier(ctx, x):
    xp = ctx.xp(x)
    x = _float_input(x)
    x = x.reshape(x.shape[0], -1) if x.ndim != 1 else x.reshape(1, -1)
    labels = _class_labels(ctx, "classlabels_ints", "classlabels_strings")
    coefficients = np.asarray(ctx.attr("coefficients"), x.dtype).reshape(-1, x.shape[1])
    scores = x @ coefficients.T
    intercepts = ctx.attr("intercepts")
    if intercepts:
        scores = scores + np.asarray(intercepts, x.dtype)
    mode = ctx.attr("post_transform", "NONE")
    if coefficients.shape[0] == 1 and len(labels) == 2:
        # One score for two classes: class 1 wins above 0 (raw) or 0.5 (transformed).
        scores = _post_transform(ctx, xp, xp.concatenate([-scores, scores], axis=1), mode)
        index = (scores[:, 1] > (0 if mode == "NONE" else 0.5)).astype(np.int32)
        if mode != "NONE":
            scores = xp.stack([1 - scores[:, 1], scores[:, 1]], axis=1)
    elif coefficients.shape[0] != len(labels):
        raise ctx.error(
            f"{coefficients.shape[0]} rows of coefficients for {len(labels)} class labels"
        )
    else:
        index = xp.argmax(scores, axis=1)
        scores = _post_transform(ctx, xp, scores, mode)
    return _pick_labels(ctx, labels, index), scores.astype(np.float32)


@register("Scaler", since=1, domain=ML)
def scaler(ctx, x):
    x = _float_input(x)
    offset = np.asarray(ctx.attr("offset", [0.0]), x.dtype)
    scale = np.asarray(ctx.attr("scale", [1.0]), x.dtype)
    return ((x - offset) * scale).astype(np.float32)


@register("Normalizer", since=1, domain=ML)
def normalizer(ctx, x):
    xp = ctx.xp(x)
    x = _float_input(x)
    x2 = x.reshape(1, -1) if x.ndim == 1 else x
    norm = ctx.attr("norm", "MAX")
    # As onnxruntime (and the spec's "max(X)"): MAX divides by the largest value, not |X|.
    if norm == "MAX":
        div = x2.max(axis=1, keepdims=True)
    elif norm == "L1":
        div = xp.abs(x2).sum(axis=1, keepdims=True)
    elif norm == "L2":
        div = xp.sqrt((x2 * x2).sum(axis=1, keepdims=True))
    else:
        raise ctx.error(f"unknown norm {norm!r}")
    # A zero norm leaves the row as it is.
    return (x2 / xp.where(div == 0, 1, div)).reshape(x.shape).astype(np.float32)


@register("Binarizer", since=1, domain=ML)
def binarizer(ctx, x):
    xp = ctx.xp(x)
    threshold = ctx.attr("threshold", 0.0)
    return xp.where(x > threshold, 1, 0).astype(x.dtype)


@register("ArrayFeatureExtractor", since=1, domain=ML)
def array_feature_extractor(ctx, data, indices):
    xp = ctx.xp(data, indices)
    if data.dtype == object:
        indices = ctx.static(indices, 1, "the indices into a string tensor")
        xp = np
    indices = indices.reshape(-1)
    if data.ndim == 1:
        return xp.take(data, indices).reshape(1, -1)
    return xp.take(data, indices, axis=-1)


def _lookup(ctx, x, keys, values, default):
    """Map every element of ``x`` found in ``keys`` to ``values``, the rest to ``default``."""
    if x.dtype == object or values.dtype == object:
        x = ctx.static(x, 0, "the input of a string mapping")
        table = {_key(k): v for k, v in zip(keys, values, strict=True)}
        flat = [table.get(_key(v), default) for v in x.reshape(-1)]
        return np.asarray(flat, dtype=values.dtype).reshape(x.shape)
    xp = ctx.xp(x)
    keys = keys.astype(x.dtype)
    hits = x[..., None] == keys
    if np.issubdtype(keys.dtype, np.floating):
        hits = hits | (xp.isnan(x)[..., None] & np.isnan(keys))
    found = hits.any(axis=-1)
    return xp.where(
        found, xp.asarray(values)[xp.argmax(hits, axis=-1)], np.asarray(default, values.dtype)
    ).astype(values.dtype)


def _key(value):
    """A hashable key that treats every NaN as the same key."""
    if isinstance(value, float | np.floating) and np.isnan(value):
        return "nan"
    return value.item() if isinstance(value, np.generic) else value


@register("LabelEncoder", since=1, domain=ML)
def label_encoder_v1(ctx, x):
    classes = np.asarray(ctx.attr("classes_strings", []), dtype=object)
    if x.dtype == object:
        return _lookup(
            ctx, x, classes, np.arange(len(classes), dtype=np.int64), ctx.attr("default_int64", -1)
        )
    return _lookup(
        ctx,
        x,
        np.arange(len(classes), dtype=np.int64),
        classes,
        ctx.attr("default_string", "_Unused"),
    )


@register("LabelEncoder", since=(2, 4), domain=ML)
def label_encoder(ctx, x):
    keys = values = None
    for name, dtype in (
        ("keys_strings", object),
        ("keys_int64s", np.int64),
        ("keys_floats", np.float32),
    ):
        if ctx.attr(name) is not None:
            keys = np.asarray(ctx.attr(name), dtype=dtype)
    if ctx.attr("keys_tensor") is not None:
        keys = ctx.attr("keys_tensor").reshape(-1)
    default = None
    for name, dtype, default_name in (
        ("values_strings", object, "default_string"),
        ("values_int64s", np.int64, "default_int64"),
        ("values_floats", np.float32, "default_float"),
    ):
        if ctx.attr(name) is not None:
            values = np.asarray(ctx.attr(name), dtype=dtype)
            default = ctx.attr(
                default_name,
                {"default_string": "_Unused", "default_int64": -1}.get(default_name, -0.0),
            )
    if ctx.attr("values_tensor") is not None:
        values = ctx.attr("values_tensor").reshape(-1)
        default_tensor = ctx.attr("default_tensor")
        if default_tensor is not None:
            default = default_tensor.reshape(-1)[0]
        else:
            default = (
                "_Unused"
                if values.dtype == object
                else values.dtype.type(-1 if np.issubdtype(values.dtype, np.integer) else -0.0)
            )
    if keys is None or values is None:
        raise ctx.error("needs keys_* and values_* attributes")
    if len(keys) != len(values):
        raise ctx.error(f"{len(keys)} keys but {len(values)} values")
    return _lookup(ctx, x, keys, values, default)


@register("CategoryMapper", since=1, domain=ML)
def category_mapper(ctx, x):
    ints = np.asarray(ctx.attr("cats_int64s", []), dtype=np.int64)
    strings = np.asarray(ctx.attr("cats_strings", []), dtype=object)
    if x.dtype == object:
        return _lookup(ctx, x, strings, ints, ctx.attr("default_int64", -1))
    return _lookup(ctx, x, ints, strings, ctx.attr("default_string", "_Unused"))


@register("OneHotEncoder", since=1, domain=ML)
def one_hot_encoder(ctx, x):
    if ctx.attr("cats_int64s"):
        cats = np.asarray(ctx.attr("cats_int64s"), dtype=np.int64)
    elif ctx.attr("cats_strings"):
        cats = np.asarray(ctx.attr("cats_strings"), dtype=object)
    else:
        raise ctx.error("needs cats_int64s or cats_strings")
    strict = not ctx.attr("zeros", 1)
    if x.dtype == object or strict:
        # zeros=0 must raise on unknown categories, which needs the values.
        x = ctx.static(x, 0, "the categories")
    xp = ctx.xp(x)
    if x.dtype != object:
        cats = (
            cats.astype(x.dtype)
            if np.issubdtype(x.dtype, np.integer)
            else cats.astype(np.float64).astype(x.dtype)
        )
    out = (x[..., None] == cats).astype(np.float32)
    if strict and not np.all(out.sum(axis=-1) > 0):
        raise ctx.error("an input value is not among the categories (zeros=0)")
    return xp.asarray(out)


@register("Imputer", since=1, domain=ML)
def imputer(ctx, x):
    xp = ctx.xp(x)
    if ctx.attr("imputed_value_floats"):
        values = np.asarray(ctx.attr("imputed_value_floats"), np.float32)
        replaced = ctx.attr("replaced_value_float", 0.0)
    elif ctx.attr("imputed_value_int64s"):
        values = np.asarray(ctx.attr("imputed_value_int64s"), np.int64)
        replaced = ctx.attr("replaced_value_int64", 0)
    else:
        raise ctx.error("needs imputed_value_floats or imputed_value_int64s")
    if x.ndim == 2 and values.size not in (1, x.shape[1]):
        raise ctx.error(f"{values.size} imputed values for {x.shape[1]} features")
    values = values.astype(x.dtype)
    missing_is_nan = isinstance(replaced, float) and np.isnan(replaced)
    mask = xp.isnan(x) if missing_is_nan else x == replaced
    return xp.where(mask, values, x)


@register("FeatureVectorizer", since=1, domain=ML)
def feature_vectorizer(ctx, *inputs):
    xp = ctx.xp(*inputs)
    dims = ctx.attr("inputdimensions", [])
    if len(dims) != len(inputs):
        raise ctx.error(f"{len(inputs)} inputs but {len(dims)} inputdimensions")
    parts = []
    for value, size in zip(inputs, dims, strict=True):
        value = value.reshape(-1, 1) if value.ndim == 1 else value.reshape(value.shape[0], -1)
        value = value.astype(np.float32)
        if value.shape[1] >= size:
            parts.append(value[:, :size])
        else:
            parts.append(xp.pad(value, [(0, 0), (0, size - value.shape[1])]))
    return xp.concatenate(parts, axis=1)


@register("ZipMap", since=1, domain=ML)
def zip_map(ctx, x):
    labels = _class_labels(ctx)
    if x.ndim != 2 or x.shape[1] != len(labels):
        raise ctx.error(f"input of shape {x.shape} does not match {len(labels)} class labels")
    keys = [int(k) for k in labels] if labels.dtype != object else [str(k) for k in labels]
    return [{key: row[j] for j, key in enumerate(keys)} for row in x]


# ---------------------------------------------------------------------------- maps
# An ONNX map is a Python dict. Its keys are always known at trace time; its values may be
# traced (a ZipMap row) unless they are strings. Outputs have shape (1, n), as in onnxruntime.

_CAST_TO = ("TO_FLOAT", "TO_STRING", "TO_INT64")
# onnxruntime pads a sparse CastMap to strings with this literal; the spec leaves it open.
_STRING_PAD = "0.f"


def _map_input(ctx, x):
    if not isinstance(x, dict):
        raise ctx.error(f"expects a map (a Python dict), got {type(x).__name__}")
    return {_map_key(k): v if isinstance(v, jax.Array) else np.asarray(v) for k, v in x.items()}


def _map_key(key):
    if isinstance(key, np.ndarray | np.generic):
        key = key.item()
    return key.decode() if isinstance(key, bytes) else key


def _is_text(value):
    return is_static(value) and value.dtype.kind in "OSU"


def _declared_map_value_dtype(ctx):
    """The value type the graph declares for the map input, if it declares one."""
    name = ctx.input_name(0)
    graph = ctx.plan.graph
    for info in (*graph.input, *graph.value_info, *graph.output):
        if info.name == name and info.type.WhichOneof("value") == "map_type":
            value_type = info.type.map_type.value_type
            if value_type.WhichOneof("value") == "tensor_type":
                return numpy_dtype(value_type.tensor_type.elem_type)
    return None


def _map_value_dtype(ctx, values):
    """Declared type first; else the values' own (Python floats read as float, ints as int64)."""
    declared = _declared_map_value_dtype(ctx)
    if declared is not None:
        return declared
    for value in values:
        if _is_text(value):
            return np.dtype(object)
        if value.dtype == np.float64 and not isinstance(value, jax.Array):
            return np.dtype(np.float32)
        return np.dtype(value.dtype)
    return np.dtype(np.float32)


def _row(ctx, values, dtype, pad):
    """``values`` (``None`` for a gap, filled with ``pad``) as an array of shape (1, n)."""
    if dtype.kind == "O":
        texts = [pad if v is None else _map_key(v) for v in values]
        return np.array(texts, dtype=object).reshape(1, -1)
    if all(v is None or is_static(v) for v in values):
        return np.array([pad if v is None else v for v in values], dtype=dtype).reshape(1, -1)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
    return jnp.stack(
        [jnp.asarray(pad if v is None else v).astype(dtype).reshape(()) for v in values]
    ).reshape(1, -1)


@register("DictVectorizer", since=1, domain=ML)
def dict_vectorizer(ctx, x):
    mapping = _map_input(ctx, x)
    ints, strings = ctx.attr("int64_vocabulary"), ctx.attr("string_vocabulary")
    if bool(ints) == bool(strings):
        raise ctx.error("needs exactly one of int64_vocabulary and string_vocabulary")
    vocabulary = [int(k) for k in ints] if ints else list(strings)
    key_type = int if ints else str
    wrong = [k for k in mapping if not isinstance(k, key_type)]
    if wrong:
        raise ctx.error(f"map key {wrong[0]!r} does not match the {key_type.__name__} vocabulary")
    dtype = _map_value_dtype(ctx, mapping.values())
    # Keys missing from the vocabulary are dropped, as onnxruntime does.
    return _row(ctx, [mapping.get(k) for k in vocabulary], dtype, "" if dtype.kind == "O" else 0)


@register("CastMap", since=1, domain=ML)
def cast_map(ctx, x):
    mapping = _map_input(ctx, x)
    cast_to = ctx.attr("cast_to", "TO_FLOAT")
    form = ctx.attr("map_form", "DENSE")
    if cast_to not in _CAST_TO:
        raise ctx.error(f"unsupported cast_to {cast_to!r}")
    if form not in ("DENSE", "SPARSE"):
        raise ctx.error(f"unsupported map_form {form!r}")
    if any(not isinstance(k, int) for k in mapping):
        raise ctx.error("CastMap takes a map with int64 keys")
    keys = sorted(mapping)
    if form == "DENSE":
        values = [mapping[k] for k in keys]
    else:
        size = ctx.attr("max_map", 1)
        if size <= 0:
            raise ctx.error(f"max_map must be positive for a SPARSE map, got {size}")
        if keys and keys[0] < 0:
            raise ctx.error(f"a SPARSE map cannot have the negative key {keys[0]}")
        # Keys from max_map on do not fit and are dropped, as onnxruntime does.
        values = [mapping.get(k) for k in range(size)]
    if cast_to == "TO_STRING":
        texts = [None if v is None else _map_value_text(ctx, v) for v in values]
        return _row(ctx, texts, np.dtype(object), _STRING_PAD)
    dtype = np.dtype(np.float32 if cast_to == "TO_FLOAT" else np.int64)
    values = [
        None
        if v is None
        else _parse_map_value(ctx, v, dtype)
        if _is_text(v)
        else v.astype(np.float32)
        for v in values
    ]
    # float32 to int64 truncates toward zero (astype), as a C++ static_cast.
    return _row(ctx, values, dtype, 0)


def _map_value_text(ctx, value):
    value = ctx.static(value, 0, "the map's values (cast to strings)")
    if _is_text(value):
        return _map_key(value)
    # C++ std::to_string of the float: six decimals.
    return f"{float(value.astype(np.float32)):.6f}"


def _parse_map_value(ctx, value, dtype):
    text = str(value.item())
    try:
        return np.asarray(parse_int(text) if dtype == np.int64 else float(text), dtype)
    except ValueError:
        raise ctx.error(f"map value {text!r} is not a number") from None


# ---------------------------------------------------------------------------- tree ensembles

_MODES = {
    "BRANCH_LEQ": 0,
    "BRANCH_LT": 1,
    "BRANCH_GTE": 2,
    "BRANCH_GT": 3,
    "BRANCH_EQ": 4,
    "BRANCH_NEQ": 5,
    "BRANCH_MEMBER": 6,
}
_AGGREGATES = ("AVERAGE", "SUM", "MIN", "MAX")


class _Forest:
    """Trees as flat arrays over one index space; leaves point to themselves."""

    def __init__(
        self,
        ctx,
        feature,
        split,
        mode,
        true_next,
        false_next,
        missing_true,
        is_leaf,
        roots,
        members=None,
        member_row=None,
    ):
        self.feature = feature.astype(np.int32)
        self.split = split
        self.mode = mode.astype(np.int32)
        self.true_next = np.where(is_leaf, np.arange(len(is_leaf)), true_next).astype(np.int32)
        self.false_next = np.where(is_leaf, np.arange(len(is_leaf)), false_next).astype(np.int32)
        self.missing_true = missing_true.astype(bool)
        self.is_leaf = is_leaf.astype(bool)
        self.roots = roots.astype(np.int32)
        self.members = members
        self.member_row = member_row
        self.depth = self._depth(ctx)

    def _depth(self, ctx):
        level = np.unique(self.roots)
        for depth in range(len(self.is_leaf) + 1):
            branches = level[~self.is_leaf[level]]
            if not branches.size:
                return depth
            level = np.unique(np.concatenate([self.true_next[branches], self.false_next[branches]]))
        raise ctx.error("the trees contain a cycle")

    def leaves(self, x):
        """Index of the leaf every sample reaches in every tree: shape [N, trees]."""
        x = jnp.asarray(x)
        split = jnp.asarray(self.split.astype(x.dtype))
        present = set(np.unique(self.mode[~self.is_leaf]).tolist())

        def step(_, index):
            value = jnp.take_along_axis(x, jnp.asarray(self.feature)[index], axis=1)
            threshold = split[index]
            mode = jnp.asarray(self.mode)[index]
            comparisons = {
                0: lambda: value <= threshold,
                1: lambda: value < threshold,
                2: lambda: value >= threshold,
                3: lambda: value > threshold,
                4: lambda: value == threshold,
                5: lambda: value != threshold,
                6: lambda: (
                    value[..., None]
                    == jnp.asarray(self.members)[jnp.asarray(self.member_row)[index]]
                ).any(axis=-1),
            }
            go_true = jnp.zeros(index.shape, bool)
            for code in sorted(present):
                go_true = jnp.where(mode == code, comparisons[code](), go_true)
            go_true = jnp.where(jnp.isnan(value), jnp.asarray(self.missing_true)[index], go_true)
            return jnp.where(
                go_true, jnp.asarray(self.true_next)[index], jnp.asarray(self.false_next)[index]
            )

        start = jnp.broadcast_to(jnp.asarray(self.roots), (x.shape[0], len(self.roots)))
        return lax.fori_loop(0, self.depth, step, start)


def _aggregate(ctx, forest, x, table, has, aggregate):
    """Per-sample sums/means/min/max over trees of the leaf values ``table`` [nodes, targets]."""
    index = forest.leaves(x)
    values = jnp.asarray(table)[index]
    if aggregate in ("SUM", "AVERAGE"):
        total = values.sum(axis=1)
        return total / len(forest.roots) if aggregate == "AVERAGE" else total
    contributes = jnp.asarray(has)[index]
    if aggregate == "MIN":
        return jnp.where(contributes, values, np.finfo(table.dtype).max).min(axis=1)
    if aggregate == "MAX":
        return jnp.where(contributes, values, np.finfo(table.dtype).min).max(axis=1)
    raise ctx.error(f"unknown aggregate_function {aggregate!r}")


def _x_matrix(x):
    x = _float_input(x)
    return x.reshape(1, -1) if x.ndim == 1 else x.reshape(x.shape[0], -1)


def _legacy_attr(ctx, name):
    tensor = ctx.attr(f"{name}_as_tensor")
    if tensor is not None:
        return np.asarray(tensor).reshape(-1)
    value = ctx.attr(name)
    return None if value is None else np.asarray(value, np.float32)


def _legacy_forest(ctx, x_dtype):
    """A _Forest from the nodes_* attributes of TreeEnsembleClassifier/Regressor."""
    tree_ids = np.asarray(ctx.attr("nodes_treeids"), np.int64)
    node_ids = np.asarray(ctx.attr("nodes_nodeids"), np.int64)
    modes = ctx.attr("nodes_modes")
    unknown = set(modes) - set(_MODES) - {"LEAF"}
    if unknown:
        raise ctx.error(f"unknown nodes_modes {sorted(unknown)}")
    mode = np.asarray([_MODES.get(m, -1) for m in modes])
    is_leaf = mode < 0
    size = len(tree_ids)
    missing = ctx.attr("nodes_missing_value_tracks_true") or [0] * size
    split = _legacy_attr(ctx, "nodes_values")
    split = np.zeros(size, np.float32) if split is None else split
    # (tree, node) pairs become row indices through one sorted key array.
    stride = int(node_ids.max()) + 1 if size else 1
    keys = tree_ids * stride + node_ids
    order = np.argsort(keys, kind="stable")

    def locate(trees, nodes, what):
        wanted = np.asarray(trees, np.int64) * stride + np.asarray(nodes, np.int64)
        position = np.clip(np.searchsorted(keys[order], wanted), 0, max(size - 1, 0))
        found = order[position]
        if size and np.any(keys[found] != wanted):
            raise ctx.error(f"{what} names a (tree, node) pair that does not exist")
        return found

    true_next = np.zeros(size, np.int64)
    false_next = np.zeros(size, np.int64)
    branch = ~is_leaf
    true_next[branch] = locate(
        tree_ids[branch], np.asarray(ctx.attr("nodes_truenodeids"))[branch], "nodes_truenodeids"
    )
    false_next[branch] = locate(
        tree_ids[branch], np.asarray(ctx.attr("nodes_falsenodeids"))[branch], "nodes_falsenodeids"
    )
    _, roots = np.unique(tree_ids, return_index=True)
    forest = _Forest(
        ctx,
        np.asarray(ctx.attr("nodes_featureids"), np.int64),
        split.astype(x_dtype),
        mode,
        true_next,
        false_next,
        np.asarray(missing),
        is_leaf,
        roots,
    )
    return forest, locate


def _leaf_table(size, n_targets, rows, targets, weights, dtype):
    table = np.zeros((size, n_targets), dtype)
    has = np.zeros((size, n_targets), bool)
    np.add.at(table, (rows, targets), weights.astype(dtype))
    has[rows, targets] = True
    return table, has


@register("TreeEnsembleRegressor", since=(1, 3, 5), domain=ML)
def tree_ensemble_regressor(ctx, x):
    x = _x_matrix(x)
    forest, locate = _legacy_forest(ctx, x.dtype)
    n_targets = ctx.attr("n_targets", 1)
    targets = np.asarray(ctx.attr("target_ids"), np.int64)
    if targets.size and (targets.max() >= n_targets or targets.min() < 0):
        raise ctx.error(f"target_ids outside [0, {n_targets})")
    rows = locate(ctx.attr("target_treeids"), ctx.attr("target_nodeids"), "target_nodeids")
    table, has = _leaf_table(
        len(forest.is_leaf), n_targets, rows, targets, _legacy_attr(ctx, "target_weights"), x.dtype
    )
    aggregate = ctx.attr("aggregate_function", "SUM")
    scores = _aggregate(ctx, forest, x, table, has, aggregate)
    base = _legacy_attr(ctx, "base_values")
    if base is not None and base.size:
        scores = scores + base.astype(x.dtype)
    return _post_transform(ctx, jnp, scores, ctx.attr("post_transform", "NONE")).astype(np.float32)


@register("TreeEnsembleClassifier", since=(1, 3, 5), domain=ML)
def tree_ensemble_classifier(ctx, x):
    x = _x_matrix(x)
    forest, locate = _legacy_forest(ctx, x.dtype)
    labels = _class_labels(ctx)
    n_classes = len(labels)
    class_ids = np.asarray(ctx.attr("class_ids"), np.int64)
    if class_ids.size and (class_ids.max() >= n_classes or class_ids.min() < 0):
        raise ctx.error(f"class_ids outside [0, {n_classes})")
    weights = _legacy_attr(ctx, "class_weights")
    rows = locate(ctx.attr("class_treeids"), ctx.attr("class_nodeids"), "class_nodeids")
    table, has = _leaf_table(len(forest.is_leaf), n_classes, rows, class_ids, weights, x.dtype)
    scores = _aggregate(ctx, forest, x, table, has, "SUM")
    base = _legacy_attr(ctx, "base_values")
    base = np.zeros(0, x.dtype) if base is None else base.astype(x.dtype)
    mode = ctx.attr("post_transform", "NONE")
    if n_classes == 2 and len(np.unique(class_ids)) == 1 and class_ids[0] == 0 and base.size < 2:
        # onnxruntime's binary case: one score s for class 1 (its weights sit on class 0).
        score = scores[:, 0] + (base[0] if base.size else 0)
        positive = bool(np.all(weights >= 0))
        index = (score > (0.5 if positive else 0)).astype(np.int32)
        if mode == "PROBIT":
            raise ctx.error("PROBIT on a binary tree classifier is not supported")
        if positive:
            scores = jnp.stack([1 - score, score], axis=1)
        elif mode == "LOGISTIC":
            scores = jax.nn.sigmoid(jnp.stack([-score, score], axis=1))
        else:
            scores = jnp.stack([-score, score], axis=1)
    else:
        if base.size:
            scores = scores + base
        index = jnp.argmax(scores, axis=1)
        scores = _post_transform(ctx, jnp, scores, mode)
    return _pick_labels(ctx, labels, index), scores.astype(np.float32)


@register("TreeEnsemble", since=5, domain=ML)
def tree_ensemble(ctx, x):
    if x.ndim != 2:
        raise ctx.error(f"X must be 2-D, got shape {x.shape}")
    modes = np.asarray(ctx.attr("nodes_modes")).reshape(-1).astype(np.int64)
    size = len(modes)
    true_ids = np.asarray(ctx.attr("nodes_truenodeids"), np.int64)
    false_ids = np.asarray(ctx.attr("nodes_falsenodeids"), np.int64)
    true_leaf = np.asarray(ctx.attr("nodes_trueleafs"), bool)
    false_leaf = np.asarray(ctx.attr("nodes_falseleafs"), bool)
    leaf_weights = np.asarray(ctx.attr("leaf_weights")).reshape(-1)
    leaf_targets = np.asarray(ctx.attr("leaf_targetids"), np.int64)
    n_leaves = len(leaf_weights)
    if np.any(modes > 6) or np.any(modes < 0):
        raise ctx.error(f"unknown node modes {sorted(set(modes[(modes > 6) | (modes < 0)]))}")
    # Branch nodes take rows [0, size); leaf j takes row size + j.
    total = size + n_leaves
    true_next = np.where(true_leaf, size + true_ids, true_ids)
    false_next = np.where(false_leaf, size + false_ids, false_ids)
    roots = np.asarray(ctx.attr("tree_roots"), np.int64)
    # A tree that is a single leaf is a root whose two branches are the same leaf.
    root_is_leaf = true_leaf[roots] & false_leaf[roots] & (true_ids[roots] == false_ids[roots])
    roots = np.where(root_is_leaf, size + true_ids[roots], roots)
    is_leaf = np.concatenate([np.zeros(size, bool), np.ones(n_leaves, bool)])
    pad = np.zeros(n_leaves, np.int64)
    missing = ctx.attr("nodes_missing_value_tracks_true") or [0] * size
    splits = np.asarray(ctx.attr("nodes_splits")).reshape(-1).astype(x.dtype)
    members, member_row = _membership_sets(ctx, modes)
    forest = _Forest(
        ctx,
        np.concatenate([np.asarray(ctx.attr("nodes_featureids")), pad]),
        np.concatenate([splits, pad.astype(x.dtype)]),
        np.concatenate([modes, pad - 1]),
        np.concatenate([true_next, pad]),
        np.concatenate([false_next, pad]),
        np.concatenate([np.asarray(missing, bool), pad.astype(bool)]),
        is_leaf,
        roots,
        members.astype(x.dtype),
        np.concatenate([member_row, pad]),
    )
    n_targets = ctx.attr("n_targets")
    table, has = _leaf_table(
        total, n_targets, size + np.arange(n_leaves), leaf_targets, leaf_weights, x.dtype
    )
    aggregate = _AGGREGATES[ctx.attr("aggregate_function", 1)]
    scores = _aggregate(ctx, forest, x, table, has, aggregate)
    return _post_transform(
        ctx, jnp, scores, _POST_TRANSFORMS[ctx.attr("post_transform", 0)]
    ).astype(x.dtype)


def _membership_sets(ctx, modes):
    """The NaN-separated membership_values as a padded [sets, members] matrix and node->row."""
    count = int(np.sum(modes == 6))
    member_row = np.zeros(len(modes), np.int64)
    if not count:
        return np.full((1, 1), np.nan), member_row
    values = ctx.attr("membership_values")
    if values is None:
        raise ctx.error("BRANCH_MEMBER nodes need membership_values")
    values = np.asarray(values, np.float64).reshape(-1)
    sets, current = [], []
    for value in values:
        if np.isnan(value):
            sets.append(current)
            current = []
        else:
            current.append(value)
    if current:
        sets.append(current)
    if len(sets) != count:
        raise ctx.error(f"membership_values holds {len(sets)} sets for {count} member nodes")
    width = max(1, max(len(s) for s in sets))
    matrix = np.full((count, width), np.nan)
    for row, members in enumerate(sets):
        matrix[row, : len(members)] = members
    member_row[modes == 6] = np.arange(count)
    return matrix, member_row


# ---------------------------------------------------------------------------- SVMs


def _kernel(ctx, x, vectors):
    """Kernel matrix [samples, vectors] for kernel_type and kernel_params (gamma, coef0, d)."""
    kind = ctx.attr("kernel_type", "LINEAR")
    params = list(ctx.attr("kernel_params", [])) or [0.0, 0.0, 0.0]
    gamma, coef0, degree = params[0], params[1], int(params[2])
    if kind == "LINEAR":
        return x @ vectors.T
    if kind == "POLY":
        return (gamma * (x @ vectors.T) + coef0) ** degree
    if kind == "SIGMOID":
        return ctx.xp(x).tanh(gamma * (x @ vectors.T) + coef0)
    if kind == "RBF":
        squared = (
            (x * x).sum(axis=1, keepdims=True)
            - 2 * (x @ vectors.T)
            + (vectors * vectors).sum(axis=1)
        )
        return ctx.xp(x).exp(-gamma * ctx.xp(x).maximum(squared, 0))
    raise ctx.error(f"unknown kernel_type {kind!r}")


@register("SVMRegressor", since=1, domain=ML)
def svm_regressor(ctx, x):
    xp = ctx.xp(x)
    x = _x_matrix(x)
    coefficients = np.asarray(ctx.attr("coefficients"), x.dtype)
    rho = np.asarray(ctx.attr("rho"), x.dtype)
    supports = ctx.attr("n_supports", 0)
    if supports > 0:
        vectors = np.asarray(ctx.attr("support_vectors"), x.dtype).reshape(supports, -1)
        scores = _kernel(ctx, x, vectors) @ coefficients + rho[0]
    else:
        scores = x @ coefficients + rho[0]
    if ctx.attr("one_class", 0):
        scores = xp.where(scores > 0, 1, -1).astype(x.dtype)
    scores = _post_transform(ctx, xp, scores[:, None], ctx.attr("post_transform", "NONE"))
    return scores.astype(np.float32)


def _pairwise_coupling(probabilities, classes):
    """libsvm's multiclass_probability on a [classes, classes] pairwise matrix (one sample)."""
    r = probabilities
    q = -(r.T * r)
    q = q - jnp.diag(jnp.diag(q)) + jnp.diag((r * r).sum(axis=0) - jnp.diag(r) ** 2)
    eps = 0.005 / classes

    def sweep(state):
        p, _, step = state
        for t in range(classes):
            qp = q @ p
            pqp = p @ qp
            diff = (-qp[t] + pqp) / q[t, t]
            p = p.at[t].add(diff) / (1 + diff)
        qp = q @ p
        return p, jnp.max(jnp.abs(qp - p @ qp)), step + 1

    def going(state):
        return (state[1] >= eps) & (state[2] < max(100, classes))

    start = jnp.full((classes,), 1.0 / classes, r.dtype)
    qp = q @ start
    p, _, _ = lax.while_loop(going, sweep, (start, jnp.max(jnp.abs(qp - start @ qp)), 0))
    return p


@register("SVMClassifier", since=1, domain=ML)
def svm_classifier(ctx, x):
    xp = ctx.xp(x)
    x = _x_matrix(x)
    labels = _class_labels(ctx, "classlabels_ints", "classlabels_strings")
    classes = len(labels)
    coefficients = np.asarray(ctx.attr("coefficients"), x.dtype)
    rho = np.asarray(ctx.attr("rho"), x.dtype)
    per_class = np.asarray(ctx.attr("vectors_per_class", []), np.int64)
    mode = ctx.attr("post_transform", "NONE")
    votes = None
    if per_class.sum() > 0:
        total = int(per_class.sum())
        vectors = np.asarray(ctx.attr("support_vectors"), x.dtype).reshape(total, -1)
        kernel = _kernel(ctx, x, vectors)
        coefs = coefficients.reshape(-1, total)
        starts = np.concatenate([[0], np.cumsum(per_class)[:-1]])
        pair_scores, votes = [], xp.zeros((x.shape[0], classes), x.dtype)
        evaluation = 0
        # One-vs-one: every pair (i, j) votes for i when its decision value is positive.
        for i in range(classes):
            for j in range(i + 1, classes):
                rows_i = slice(starts[i], starts[i] + per_class[i])
                rows_j = slice(starts[j], starts[j] + per_class[j])
                score = (
                    rho[evaluation]
                    + kernel[:, rows_i] @ coefs[j - 1, rows_i]
                    + kernel[:, rows_j] @ coefs[i, rows_j]
                )
                win = (score > 0).astype(x.dtype)
                votes = votes + xp.stack(
                    [
                        win if c == i else (1 - win) if c == j else xp.zeros_like(win)
                        for c in range(classes)
                    ],
                    axis=1,
                )
                pair_scores.append(score)
                evaluation += 1
        scores = xp.stack(pair_scores, axis=1)
    else:
        coefs = coefficients.reshape(classes, -1)
        offsets = rho if rho.size == classes else rho[0]
        scores = x @ coefs.T + offsets
    has_probability = bool(ctx.attr("prob_a")) and votes is not None
    if has_probability:
        prob_a = np.asarray(ctx.attr("prob_a"), x.dtype)
        prob_b = np.asarray(ctx.attr("prob_b"), x.dtype)
        pairwise = jnp.clip(1 - jax.nn.sigmoid(scores * prob_a + prob_b), 1e-7, 1 - 1e-7)
        matrix = jnp.zeros((x.shape[0], classes, classes), pairwise.dtype)
        evaluation = 0
        for i in range(classes):
            for j in range(i + 1, classes):
                matrix = matrix.at[:, i, j].set(pairwise[:, evaluation])
                matrix = matrix.at[:, j, i].set(1 - pairwise[:, evaluation])
                evaluation += 1
        scores = jax.vmap(lambda m: _pairwise_coupling(m, classes))(matrix)
        xp = jnp
    # The label comes from the one-vs-one votes even when probabilities are computed.
    index = xp.argmax(votes if votes is not None else scores, axis=1)
    if votes is not None and classes == 2 and not has_probability:
        # Binary one-vs-one with decision value s: onnxruntime writes [-s, s] (NONE),
        # [sigmoid(-s), sigmoid(s)] (LOGISTIC) or [1 - s, s] (SOFTMAX).
        if mode == "NONE":
            scores = xp.concatenate([-scores, scores], axis=1)
        elif mode == "LOGISTIC":
            scores = 1 / (1 + xp.exp(xp.concatenate([scores, -scores], axis=1)))
        elif mode == "SOFTMAX":
            scores = xp.concatenate([1 - scores, scores], axis=1)
        else:
            raise ctx.error(f"post_transform {mode} on a binary SVMClassifier is not supported")
        return _pick_labels(ctx, labels, index), scores.astype(np.float32)
    return _pick_labels(ctx, labels, index), _post_transform(ctx, xp, scores, mode).astype(
        np.float32
    )
