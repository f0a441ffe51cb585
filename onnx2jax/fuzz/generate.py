"""Random small ONNX graphs: chains of registered ops with valid attributes, shapes and dtypes.

The dtypes an op accepts come from its ``onnx.defs`` schema (its type constraints); the
attributes and shapes that make a node valid come from the hand-written generators below,
one per op family. Every node is checked by ONNX shape inference as it is added, so each
graph is valid by construction, and the inferred output types feed the next node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 21
MAX_RANK = 4

# The dtypes graphs use (others, such as bfloat16 and float8, lack onnxruntime CPU kernels for
# most ops and would only measure onnxruntime's gaps).
_ONNX_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}
FLOATS = (np.float32, np.float64, np.float16)


class Reject(Exception):
    """The generator drew a combination that is not valid for this op; draw again."""


def schema_dtypes(op_type: str, index: int = 0, opset: int = OPSET) -> list[type]:
    """The dtypes (of those graphs use) that input ``index`` of ``op_type`` accepts."""
    schema = onnx.defs.get_schema(op_type, opset)
    formal = schema.inputs[min(index, len(schema.inputs) - 1)]
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    strings = allowed.get(formal.type_str, [formal.type_str])
    return [_ONNX_TO_NUMPY[s] for s in strings if s in _ONNX_TO_NUMPY]


@dataclass
class Value:
    """A tensor the graph defines: dtype and shape (None where shape inference left it open)."""

    dtype: type
    shape: tuple[int, ...] | None
    static: bool  # depends only on initializers (onnx2jax computes it with NumPy)
    type: onnx.TypeProto | None = None  # as shape inference gave it


@dataclass
class Case:
    """A graph under construction: its inputs (with their data), initializers and nodes."""

    rng: np.random.Generator
    opset: int = OPSET
    special: bool = False  # floats include 0, -0, inf and nan
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    initializers: dict[str, np.ndarray] = field(default_factory=dict)
    values: dict[str, Value] = field(default_factory=dict)
    counter: int = 0

    # ---------------------------------------------------------------- naming and data
    def name(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def data(
        self,
        dtype: type,
        shape: tuple[int, ...],
        *,
        low: float | None = None,
        high: float | None = None,
        nonzero: bool = False,
        finite: bool = False,
    ) -> np.ndarray:
        """Random data: small integers, normal floats, special floats in some cases."""
        rng = self.rng
        dtype = np.dtype(dtype)
        if dtype == np.bool_:
            return np.asarray(rng.random(shape) < 0.5)
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            lo = int(max(info.min, -9 if low is None else low))
            hi = int(min(info.max, 9 if high is None else high))
            out = np.asarray(rng.integers(lo, hi + 1, size=shape)).astype(dtype)
            if nonzero:
                out[out == 0] = 1
            return out
        lo = -3.0 if low is None else low
        hi = 3.0 if high is None else high
        out = np.asarray(rng.uniform(lo, hi, size=shape))
        if rng.random() < 0.3:  # exact small values: ties, equal elements, exact zeros
            out = np.asarray(np.round(out * 2) / 2)
        if nonzero:
            out[np.abs(out) < 0.25] = 0.5
        out = np.asarray(out.astype(dtype))
        if self.special and not finite and out.size and not nonzero:
            specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], dtype)
            mask = np.asarray(rng.random(shape) < 0.2)
            out[mask] = rng.choice(specials, size=int(mask.sum()))
        return out

    def dims(self, rank: int, *, min_dim: int = 0) -> tuple[int, ...]:
        """A random shape: mostly 1-4, sometimes 0-size."""
        choices = [1, 2, 3, 4] if min_dim > 0 else [0, 1, 1, 2, 3, 4, 2, 3]
        out = []
        for _ in range(rank):
            d = int(self.rng.choice(choices))
            if d == 0 and self.rng.random() < 0.6:
                d = 2
            out.append(max(d, min_dim))
        return tuple(out)

    def fresh(
        self, dtype: type, shape: tuple[int, ...], *, init: bool | None = None, **data_kw: object
    ) -> str:
        """A new graph input (or, sometimes, initializer) of this dtype and shape."""
        if init is None:
            init = self.rng.random() < 0.15
        name = self.name("c" if init else "x")
        array = self.data(dtype, shape, **data_kw)
        (self.initializers if init else self.inputs)[name] = array
        self.values[name] = Value(np.dtype(dtype).type, tuple(shape), init)
        return name

    def const(self, array: np.ndarray) -> str:
        """A static initializer (axes, shapes, pads...)."""
        name = self.name("k")
        self.initializers[name] = np.asarray(array)
        self.values[name] = Value(np.asarray(array).dtype.type, np.shape(array), True)
        return name

    def pick(
        self,
        dtypes: list[type],
        *,
        min_rank: int = 0,
        max_rank: int = MAX_RANK,
        min_dim: int = 0,
        reuse: float = 0.65,
        **data_kw: object,
    ) -> str:
        """An existing tensor of one of ``dtypes`` (chaining the nodes) or a fresh one."""
        dtypes = [np.dtype(d).type for d in dtypes]
        if not dtypes:
            raise Reject("no dtype")
        if self.rng.random() < reuse and not data_kw:
            usable = [
                n
                for n, v in self.values.items()
                if v.dtype in dtypes
                and v.shape is not None
                and min_rank <= len(v.shape) <= max_rank
                and all(d >= min_dim for d in v.shape)
            ]
            produced = [n for n in usable if n not in self.inputs]
            pool = produced if produced and self.rng.random() < 0.8 else usable
            if pool:
                return pool[int(self.rng.integers(len(pool)))]
        dtype = dtypes[int(self.rng.integers(len(dtypes)))]
        rank = int(self.rng.integers(min_rank, max_rank + 1))
        return self.fresh(dtype, self.dims(rank, min_dim=min_dim), **data_kw)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self.values[name].shape
        assert shape is not None
        return shape

    def dtype(self, name: str) -> type:
        return self.values[name].dtype

    def partner(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A shape that broadcasts with ``shape`` (multidirectionally)."""
        rng = self.rng
        out = [1 if rng.random() < 0.25 else d for d in shape]
        if out and rng.random() < 0.3:
            out = out[int(rng.integers(len(out) + 1)) :]
        elif len(out) < MAX_RANK and rng.random() < 0.15:
            out = [int(rng.choice([1, 2]))] + out
        if shape and all(d == 1 for d in shape) and rng.random() < 0.3:
            out = list(self.dims(len(shape)))
        return tuple(out)

    # ---------------------------------------------------------------- the graph
    def model(self, outputs: list[str] | None = None) -> onnx.ModelProto:
        """The graph so far as a model; by default every node output is a graph output."""
        if outputs is None:
            outputs = [o for n in self.nodes for o in n.output if o]
        graph = helper.make_graph(
            list(self.nodes),
            "fuzz",
            [
                helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                for n, a in self.inputs.items()
            ],
            [self._output_info(n) for n in outputs],
            initializer=[numpy_helper.from_array(a, n) for n, a in self.initializers.items()],
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=10
        )

    def _output_info(self, name: str) -> onnx.ValueInfoProto:
        value = self.values.get(name)
        if value is None:  # the node being validated: shape inference fills it in
            return helper.make_value_info(name, onnx.TypeProto())
        if value.type is not None:
            return helper.make_value_info(name, value.type)
        return helper.make_tensor_value_info(
            name, helper.np_dtype_to_tensor_dtype(np.dtype(value.dtype)), value.shape
        )

    def add(self, node: onnx.NodeProto) -> None:
        """Append ``node`` after shape inference validates it; record its outputs' types."""
        self.nodes.append(node)
        try:
            inferred = onnx.shape_inference.infer_shapes(
                self.model([o for o in node.output if o]),
                check_type=True,
                strict_mode=True,
                data_prop=True,
            )
        except Exception as exc:
            self.nodes.pop()
            raise Reject(f"shape inference: {exc}") from exc
        types = {v.name: v.type for v in inferred.graph.output}
        static = (
            all(self.values[i].static for i in node.input if i)
            and bool(node.input)
            and node.op_type not in ("If", "Loop")
        )
        for out in node.output:
            if not out:
                continue
            t = types.get(out)
            if t is None or not t.HasField("tensor_type") or not t.tensor_type.elem_type:
                self.nodes.pop()
                raise Reject("no type inferred")
            tt = t.tensor_type
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).type
            if not tt.HasField("shape"):
                self.nodes.pop()
                raise Reject("no shape inferred")  # the checker wants graph outputs shaped
            shape: tuple[int, ...] | None = None
            if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
                shape = tuple(int(d.dim_value) for d in tt.shape.dim)
            self.values[out] = Value(dtype, shape, static, t)


Generator = Callable[[Case, str], tuple[list[str], dict, int]]
GENERATORS: dict[str, Generator] = {}


def gen(*ops: str) -> Callable[[Generator], Generator]:
    def decorate(function: Generator) -> Generator:
        for op in ops:
            GENERATORS[op] = function
        return function

    return decorate


def _rank_axis(c: Case, rank: int) -> int:
    axis = int(c.rng.integers(rank)) if rank else 0
    return axis - rank if c.rng.random() < 0.3 else axis


# ---------------------------------------------------------------- elementwise
UNARY = (
    "Abs",
    "Neg",
    "Exp",
    "Log",
    "Sqrt",
    "Reciprocal",
    "Floor",
    "Ceil",
    "Round",
    "Sign",
    "Sin",
    "Cos",
    "Tan",
    "Asin",
    "Acos",
    "Atan",
    "Sinh",
    "Cosh",
    "Asinh",
    "Acosh",
    "Atanh",
    "Erf",
    "Tanh",
    "Sigmoid",
    "Relu",
    "Softplus",
    "Softsign",
    "HardSwish",
    "Mish",
    "Not",
    "IsNaN",
    "BitwiseNot",
    "Identity",
)


@gen(*UNARY)
def _unary(c: Case, op: str) -> tuple[list[str], dict, int]:
    return [c.pick(schema_dtypes(op, 0, c.opset))], {}, 1


@gen("IsInf")
def _isinf(c: Case, op: str) -> tuple[list[str], dict, int]:
    attrs = {"detect_positive": int(c.rng.integers(2)), "detect_negative": int(c.rng.integers(2))}
    return [c.pick(schema_dtypes(op, 0, c.opset))], attrs, 1


def _alpha(c: Case, lo: float = 0.05, hi: float = 2.0) -> float:
    return float(np.float32(round(float(c.rng.uniform(lo, hi)), 2)))


@gen("LeakyRelu", "Elu", "Selu", "HardSigmoid", "ThresholdedRelu", "Celu", "Gelu", "Shrink")
def _unary_attrs(c: Case, op: str) -> tuple[list[str], dict, int]:
    attrs: dict = {}
    if c.rng.random() < 0.7:
        if op in ("LeakyRelu", "Elu", "ThresholdedRelu", "Celu", "HardSigmoid", "Selu"):
            attrs["alpha"] = _alpha(c)
        if op == "HardSigmoid":
            attrs["beta"] = _alpha(c, 0.0, 1.0)
        if op == "Selu":
            attrs["gamma"] = _alpha(c, 0.5, 2.0)
        if op == "Gelu":
            attrs["approximate"] = str(c.rng.choice(["none", "tanh"]))
        if op == "Shrink":
            attrs["bias"] = _alpha(c, 0.0, 1.0)
            attrs["lambd"] = _alpha(c, 0.0, 1.5)
    return [c.pick(schema_dtypes(op, 0, c.opset))], attrs, 1


BINARY = (
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "And",
    "Or",
    "Xor",
    "Equal",
    "Less",
    "Greater",
    "LessOrEqual",
    "GreaterOrEqual",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "Mod",
    "BitShift",
    "PRelu",
)


@gen(*BINARY)
def _binary(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    dtype, shape = c.dtype(a), c.shape(a)
    attrs: dict = {}
    kw: dict = {}
    if op == "PRelu":  # the slope broadcasts to X (unidirectionally)
        other = tuple(d if c.rng.random() < 0.5 else 1 for d in shape)
        other = other[int(c.rng.integers(len(other) + 1)) :] if other else other
    else:
        other = c.partner(shape)
    if op in ("Div", "Mod") and np.dtype(dtype).kind in "iu":
        kw["nonzero"] = True  # integer division by zero is undefined behaviour in onnxruntime
    if op == "Mod":
        attrs["fmod"] = 1 if np.dtype(dtype).kind == "f" else int(c.rng.integers(2))
    if op == "BitShift":
        attrs["direction"] = str(c.rng.choice(["LEFT", "RIGHT"]))
        kw.update(low=0, high=np.dtype(dtype).itemsize * 8 - 1)
    if op == "Pow" and np.dtype(dtype).kind in "iu":
        kw.update(low=0, high=3)  # negative integer exponents are undefined
    if op == "Pow":
        b = c.fresh(
            c.rng.choice(schema_dtypes(op, 1, c.opset)) if np.dtype(dtype).kind == "f" else dtype,
            other,
            **kw,
        )
    else:
        b = c.fresh(dtype, other, **kw) if kw or c.rng.random() < 0.6 else c.pick([dtype], **kw)
        if op != "PRelu" and not kw and b in c.values and c.values[b].shape is not None:
            try:
                np.broadcast_shapes(shape, c.shape(b))
            except ValueError:
                b = c.fresh(dtype, other)
        if op == "PRelu":
            try:
                if np.broadcast_shapes(shape, c.shape(b)) != shape:
                    raise Reject("PRelu slope")
            except ValueError as exc:
                raise Reject("PRelu slope") from exc
    inputs = [a, b] if c.rng.random() < 0.5 or op in ("PRelu", "Pow", "BitShift") else [b, a]
    return inputs, attrs, 1


@gen("Max", "Min", "Sum", "Mean")
def _variadic(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    rest = [c.fresh(c.dtype(a), c.partner(c.shape(a))) for _ in range(int(c.rng.integers(0, 3)))]
    return [a, *rest], {}, 1


@gen("Where")
def _where(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 1, c.opset))
    b = c.fresh(c.dtype(a), c.partner(c.shape(a)))
    cond = c.fresh(np.bool_, c.partner(c.shape(a)))
    return [cond, a, b], {}, 1


@gen("Clip")
def _clip(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    dtype = c.dtype(a)
    lo = c.fresh(dtype, (), init=c.rng.random() < 0.5, finite=True) if c.rng.random() < 0.7 else ""
    hi = c.fresh(dtype, (), init=c.rng.random() < 0.5, finite=True) if c.rng.random() < 0.7 else ""
    return [a, lo, hi], {}, 1


@gen("Cast")
def _cast(c: Case, op: str) -> tuple[list[str], dict, int]:
    to = c.rng.choice(list(_ONNX_TO_NUMPY.values()))
    source = schema_dtypes(op, 0, c.opset)
    src = c.rng.choice(source)
    if np.dtype(src).kind == "f" and np.dtype(to).kind in "iub":
        # Out-of-range float -> int is undefined (C++ UB in onnxruntime): fresh in-range data.
        info = np.iinfo(to) if np.dtype(to).kind in "iu" else None
        low = max(-100.0, float(info.min)) if info else -2.0
        high = min(100.0, float(info.max)) if info else 2.0
        a = c.fresh(src, c.dims(int(c.rng.integers(0, 4))), low=low, high=high, finite=True)
    else:
        a = c.pick([src])
    return [a], {"to": int(helper.np_dtype_to_tensor_dtype(np.dtype(to)))}, 1


# ---------------------------------------------------------------- reductions and softmax
REDUCE = (
    "ReduceSum",
    "ReduceMean",
    "ReduceMax",
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceLogSum",
    "ReduceLogSumExp",
    "ReduceSumSquare",
)


def _axes(c: Case, rank: int) -> list[int]:
    """A random sorted set of distinct axes (possibly empty), some written negative."""
    count = int(c.rng.integers(0, rank + 1))
    axes = sorted(c.rng.choice(rank, size=count, replace=False).tolist()) if rank else []
    return [a - rank if c.rng.random() < 0.3 else a for a in axes]


@gen(*REDUCE)
def _reduce(c: Case, op: str) -> tuple[list[str], dict, int]:
    dtypes = schema_dtypes(op, 0, c.opset)
    if op == "ReduceMean":
        # Other integer means run in the reference evaluator, whose sums wrap around.
        dtypes = [d for d in dtypes if np.dtype(d).kind == "f" or d in (np.int32, np.int64)]
    if op in ("ReduceLogSum", "ReduceLogSumExp"):
        # Integer logarithms round differently in every engine (and log(0) -> int is undefined).
        dtypes = [d for d in dtypes if np.dtype(d).kind == "f"]
    a = c.pick(dtypes)
    rank = len(c.shape(a))
    attrs = {"keepdims": int(c.rng.integers(2))}
    if c.rng.random() < 0.3:
        attrs["noop_with_empty_axes"] = int(c.rng.integers(2))
    inputs = [a]
    if c.rng.random() < 0.8:
        inputs.append(c.const(np.array(_axes(c, rank), np.int64)))
    if op == "ReduceMean" and np.dtype(c.dtype(a)).kind in "iu" and 0 in c.shape(a):
        raise Reject("integer mean of nothing")  # 0 / 0 converted to an integer: undefined
    if op in ("ReduceMax", "ReduceMin") and 0 in c.shape(a):
        raise Reject("max of nothing")  # onnxruntime fills with the dtype's lowest; spec: error
    return inputs, attrs, 1


@gen("ArgMax", "ArgMin")
def _arg(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1, min_dim=1)
    rank = len(c.shape(a))
    attrs = {
        "axis": _rank_axis(c, rank),
        "keepdims": int(c.rng.integers(2)),
        "select_last_index": int(c.rng.integers(2)),
    }
    return [a], attrs, 1


@gen("Softmax", "LogSoftmax", "Hardmax")
def _softmax(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    return [a], {"axis": _rank_axis(c, len(c.shape(a)))}, 1


@gen("CumSum")
def _cumsum(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    axis = c.const(np.array(_rank_axis(c, len(c.shape(a))), np.int64))
    return [a, axis], {"exclusive": int(c.rng.integers(2)), "reverse": int(c.rng.integers(2))}, 1


# ---------------------------------------------------------------- shape ops
@gen("Reshape")
def _reshape(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    shape = c.shape(a)
    size = int(np.prod(shape))
    if size == 0:
        target = list(c.dims(int(c.rng.integers(1, 4))))
        target[int(c.rng.integers(len(target)))] = 0
    else:  # a factorisation of the size
        target, rest = [], size
        for p in (2, 3, 2, 5, 7):
            while rest % p == 0 and c.rng.random() < 0.5:
                target.append(p)
                rest //= p
        target.append(rest)
        c.rng.shuffle(target)
        if c.rng.random() < 0.3:
            target.insert(int(c.rng.integers(len(target) + 1)), 1)
        if len(target) > MAX_RANK:
            target = [int(np.prod(target[: -MAX_RANK + 1]))] + target[-MAX_RANK + 1 :]
        if c.rng.random() < 0.4:
            target[int(c.rng.integers(len(target)))] = -1
        elif c.rng.random() < 0.3 and len(target) <= len(shape):
            i = int(c.rng.integers(len(target)))
            if target[i] == shape[i]:
                target[i] = 0  # copy the input's dim
    return [a, c.const(np.array(target, np.int64))], {}, 1


@gen("Transpose")
def _transpose(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    rank = len(c.shape(a))
    attrs = (
        {"perm": [int(p) for p in c.rng.permutation(rank)]} if rank and c.rng.random() < 0.8 else {}
    )
    return [a], attrs, 1


@gen("Squeeze")
def _squeeze(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    shape = c.shape(a)
    ones = [i for i, d in enumerate(shape) if d == 1]
    if not ones:
        raise Reject("nothing to squeeze")
    if c.rng.random() < 0.2:
        return [a], {}, 1
    chosen = [i for i in ones if c.rng.random() < 0.6] or ones[:1]
    chosen = [i - len(shape) if c.rng.random() < 0.3 else i for i in chosen]
    return [a, c.const(np.array(chosen, np.int64))], {}, 1


@gen("Unsqueeze")
def _unsqueeze(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), max_rank=MAX_RANK - 1)
    rank = len(c.shape(a))
    count = int(c.rng.integers(1, 3))
    out_rank = rank + count
    axes = sorted(c.rng.choice(out_rank, size=count, replace=False).tolist())
    axes = [x - out_rank if c.rng.random() < 0.3 else x for x in axes]
    return [a, c.const(np.array(axes, np.int64))], {}, 1


@gen("Flatten")
def _flatten(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    rank = len(c.shape(a))
    axis = int(c.rng.integers(-rank, rank + 1))
    return [a], {"axis": axis}, 1


@gen("Concat")
def _concat(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    axis = _rank_axis(c, len(shape))
    others = []
    for _ in range(int(c.rng.integers(1, 3))):
        s = list(shape)
        s[axis] = int(c.rng.integers(0, 4))
        others.append(c.fresh(c.dtype(a), tuple(s)))
    inputs = [a, *others]
    c.rng.shuffle(inputs)
    return list(inputs), {"axis": axis}, 1


@gen("Split")
def _split(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    axis = _rank_axis(c, len(shape))
    n = shape[axis]
    if c.rng.random() < 0.5 and n >= 1:
        parts = int(c.rng.integers(1, min(n, 3) + 1))
        return [a], {"axis": axis, "num_outputs": parts}, parts
    cuts = sorted(c.rng.integers(0, n + 1, size=int(c.rng.integers(1, 3))).tolist())
    sizes = np.diff([0, *cuts, n]).astype(np.int64)
    return [a, c.const(sizes)], {"axis": axis}, len(sizes)


@gen("Slice")
def _slice(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    rank = len(shape)
    axes = _axes(c, rank) or [0]
    starts, ends, steps = [], [], []
    for axis in axes:
        n = shape[axis]
        step = int(c.rng.choice([1, 1, 1, 2, 3, -1, -2]))
        s = int(c.rng.integers(-n - 2, n + 3))
        e = int(c.rng.integers(-n - 2, n + 3))
        if c.rng.random() < 0.15:
            e = int(c.rng.choice([np.iinfo(np.int64).max, np.iinfo(np.int64).min]))
        starts.append(s)
        ends.append(e)
        steps.append(step)
    inputs = [a, c.const(np.array(starts, np.int64)), c.const(np.array(ends, np.int64))]
    if c.rng.random() < 0.8 or any(st != 1 for st in steps):
        inputs.append(c.const(np.array(axes, np.int64)))
        if any(st != 1 for st in steps) or c.rng.random() < 0.5:
            inputs.append(c.const(np.array(steps, np.int64)))
    elif axes != list(range(len(axes))):
        raise Reject("axes needed")
    return inputs, {}, 1


@gen("Expand")
def _expand(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    shape = c.shape(a)
    target = [d if d != 1 or c.rng.random() < 0.5 else int(c.rng.integers(0, 4)) for d in shape]
    target = [1 if c.rng.random() < 0.2 else d for d in target]  # 1 keeps the input's dim
    if len(target) < MAX_RANK and c.rng.random() < 0.4:
        target.insert(0, int(c.rng.integers(1, 4)))
    return [a, c.const(np.array(target, np.int64))], {}, 1


@gen("Tile")
def _tile(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    reps = c.rng.integers(0 if c.rng.random() < 0.1 else 1, 3, size=len(c.shape(a)))
    return [a, c.const(reps.astype(np.int64))], {}, 1


@gen("Shape")
def _shape(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset))
    rank = len(c.shape(a))
    attrs = {}
    if c.rng.random() < 0.5:
        attrs["start"] = int(c.rng.integers(-rank - 1, rank + 2))
    if c.rng.random() < 0.5:
        attrs["end"] = int(c.rng.integers(-rank - 1, rank + 2))
    return [a], attrs, 1


@gen("Size")
def _size(c: Case, op: str) -> tuple[list[str], dict, int]:
    return [c.pick(schema_dtypes(op, 0, c.opset))], {}, 1


def _indices(c: Case, n: int, shape: tuple[int, ...]) -> str:
    if n == 0 and int(np.prod(shape)):
        raise Reject("no index into an empty axis")
    dtype = c.rng.choice([np.int64, np.int32])
    return c.fresh(dtype, shape, low=-n, high=n - 1, init=c.rng.random() < 0.3)


@gen("Gather")
def _gather(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    axis = _rank_axis(c, len(shape))
    idx = _indices(c, shape[axis], c.dims(int(c.rng.integers(0, 3))))
    return [a, idx], {"axis": axis}, 1


@gen("GatherElements")
def _gather_elements(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    axis = _rank_axis(c, len(shape))
    ishape = tuple(
        int(c.rng.integers(0, d + 1)) if i != axis % len(shape) else int(c.rng.integers(0, 4))
        for i, d in enumerate(shape)
    )
    return [a, _indices(c, shape[axis], ishape)], {"axis": axis}, 1


@gen("Pad")
def _pad(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    mode = str(c.rng.choice(["constant", "constant", "reflect", "edge", "wrap"]))
    rank = len(shape)
    axes = _axes(c, rank) if c.rng.random() < 0.3 else list(range(rank))
    if not axes:
        axes = [0]
    if mode != "constant" and any(shape[x] == 0 for x in axes):
        raise Reject("pad of an empty axis")
    lo_pad = -1 if mode == "constant" else 0
    pads = []
    for x in axes * 2:
        hi = shape[x] - 1 if mode == "reflect" else 3
        pads.append(int(c.rng.integers(lo_pad if shape[x] else 0, max(hi, 0) + 1)))
    inputs = [a, c.const(np.array(pads, np.int64))]
    if mode == "constant" and c.rng.random() < 0.5:
        inputs.append(c.fresh(c.dtype(a), (), init=True, finite=True))
    elif axes != list(range(rank)):
        inputs.append("")
    if axes != list(range(rank)):
        inputs.append(c.const(np.array(axes, np.int64)))
    return inputs, {"mode": mode}, 1


@gen("Trilu")
def _trilu(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=2)
    inputs = [a]
    if c.rng.random() < 0.7:
        inputs.append(c.const(np.array(int(c.rng.integers(-3, 4)), np.int64)))
    return inputs, {"upper": int(c.rng.integers(2))}, 1


@gen("TopK")
def _topk(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1, finite=True)
    shape = c.shape(a)
    axis = _rank_axis(c, len(shape))
    k = int(c.rng.integers(0, shape[axis] + 1))
    attrs = {"axis": axis, "largest": int(c.rng.integers(2)), "sorted": 1}
    return [a, c.const(np.array([k], np.int64))], attrs, 2


@gen("ConstantOfShape")
def _constant_of_shape(c: Case, op: str) -> tuple[list[str], dict, int]:
    shape = c.const(np.array(c.dims(int(c.rng.integers(0, 4))), np.int64))
    dtype = c.rng.choice([np.float32, np.int64, np.int32, np.bool_, np.float16])
    value = numpy_helper.from_array(c.data(dtype, (1,), finite=True))
    return [shape], {"value": value}, 1


@gen("Range")
def _range(c: Case, op: str) -> tuple[list[str], dict, int]:
    dtype = c.rng.choice([np.float32, np.float64, np.int32, np.int64])
    start = c.fresh(dtype, (), init=True, low=-5, high=5, finite=True)
    limit = c.fresh(dtype, (), init=True, low=-5, high=5, finite=True)
    delta = c.fresh(dtype, (), init=True, low=-3, high=3, nonzero=True)
    return [start, limit, delta], {}, 1


@gen("DepthToSpace", "SpaceToDepth")
def _depth_space(c: Case, op: str) -> tuple[list[str], dict, int]:
    b = int(c.rng.integers(1, 3))
    n, ch, h, w = c.dims(4, min_dim=1)
    shape = (n, ch * b * b, h, w) if op == "DepthToSpace" else (n, ch, h * b, w * b)
    a = c.fresh(c.rng.choice(schema_dtypes(op, 0, c.opset)), shape)
    attrs = {"blocksize": b}
    if op == "DepthToSpace":
        attrs["mode"] = str(c.rng.choice(["DCR", "CRD"]))
    return [a], attrs, 1


# ---------------------------------------------------------------- linear algebra and nn
@gen("MatMul")
def _matmul(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    k = shape[-1]
    rank_b = int(c.rng.integers(1, MAX_RANK + 1))
    if rank_b == 1:
        other = (k,)
    else:
        batch = c.partner(shape[:-2]) if len(shape) > 2 else c.dims(rank_b - 2)
        other = (*batch[: max(rank_b - 2, 0)], k, int(c.rng.integers(0, 4)))
    b = c.fresh(c.dtype(a), other)
    return [a, b], {}, 1


@gen("Gemm")
def _gemm(c: Case, op: str) -> tuple[list[str], dict, int]:
    dtype = c.rng.choice(schema_dtypes(op, 0, c.opset))
    m, k, n = c.dims(3)
    ta, tb = int(c.rng.integers(2)), int(c.rng.integers(2))
    a = c.fresh(dtype, (k, m) if ta else (m, k))
    b = c.fresh(dtype, (n, k) if tb else (k, n))
    attrs = {"transA": ta, "transB": tb}
    # Float alpha and beta scale integer products only where they are whole numbers.
    if c.rng.random() < 0.5 and np.dtype(dtype).kind == "f":
        attrs["alpha"] = _alpha(c, -2, 2)
        attrs["beta"] = _alpha(c, -2, 2)
    inputs = [a, b]
    if c.rng.random() < 0.7:
        cshape = [(m, n), (n,), (1, n), (m, 1), (), (1,)][int(c.rng.integers(6))]
        inputs.append(c.fresh(dtype, cshape))
    return inputs, attrs, 1


def _conv_geometry(c: Case, spatial: int) -> tuple[dict, tuple[int, ...]]:
    kernel = tuple(int(c.rng.integers(1, 4)) for _ in range(spatial))
    attrs: dict = {"kernel_shape": list(kernel)}
    if c.rng.random() < 0.5:
        attrs["strides"] = [int(c.rng.integers(1, 3)) for _ in range(spatial)]
    if c.rng.random() < 0.3:
        attrs["auto_pad"] = str(c.rng.choice(["SAME_UPPER", "SAME_LOWER", "VALID"]))
    elif c.rng.random() < 0.6:
        attrs["pads"] = [int(c.rng.integers(0, k)) for k in kernel * 2]
    return attrs, kernel


@gen("Conv")
def _conv(c: Case, op: str) -> tuple[list[str], dict, int]:
    spatial = int(c.rng.integers(1, 3))
    group = int(c.rng.choice([1, 1, 2]))
    n = int(c.rng.integers(1, 3))
    cin = group * int(c.rng.integers(1, 3))
    cout = group * int(c.rng.integers(1, 3))
    attrs, kernel = _conv_geometry(c, spatial)
    if c.rng.random() < 0.3:
        attrs["dilations"] = [int(c.rng.integers(1, 3)) for _ in range(spatial)]
    dil = attrs.get("dilations", [1] * spatial)
    size = tuple(
        int(c.rng.integers((k - 1) * d + 1, (k - 1) * d + 5))
        for k, d in zip(kernel, dil, strict=True)
    )
    dtype = c.rng.choice(schema_dtypes(op, 0, c.opset))
    x = c.fresh(dtype, (n, cin, *size))
    w = c.fresh(dtype, (cout, cin // group, *kernel))
    attrs["group"] = group
    inputs = [x, w]
    if c.rng.random() < 0.5:
        inputs.append(c.fresh(dtype, (cout,)))
    if c.rng.random() < 0.3:
        del attrs["kernel_shape"]
    return inputs, attrs, 1


@gen("MaxPool", "AveragePool", "LpPool")
def _pool(c: Case, op: str) -> tuple[list[str], dict, int]:
    spatial = int(c.rng.integers(1, 3))
    attrs, kernel = _conv_geometry(c, spatial)
    # onnxruntime sizes SAME padding with dilations differently from the spec (and shape
    # inference); onnx2jax follows onnxruntime, so the generator leaves that pair out.
    if op in ("MaxPool", "LpPool") and c.rng.random() < 0.3 and "auto_pad" not in attrs:
        attrs["dilations"] = [int(c.rng.integers(1, 3)) for _ in range(spatial)]
    dil = attrs.get("dilations", [1] * spatial)
    size = tuple(
        int(c.rng.integers((k - 1) * d + 1, (k - 1) * d + 5))
        for k, d in zip(kernel, dil, strict=True)
    )
    if op != "LpPool" and c.rng.random() < 0.3 and "auto_pad" not in attrs:
        attrs["ceil_mode"] = 1
    if op == "AveragePool" and c.rng.random() < 0.5:
        attrs["count_include_pad"] = 1
    if op == "LpPool":
        attrs["p"] = int(c.rng.integers(1, 4))
    n, ch = c.dims(2, min_dim=1)
    x = c.fresh(c.rng.choice(schema_dtypes(op, 0, c.opset)), (n, ch, *size))
    return [x], attrs, 1


@gen("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(c: Case, op: str) -> tuple[list[str], dict, int]:
    return [c.pick(schema_dtypes(op, 0, c.opset), min_rank=3, min_dim=1)], {}, 1


@gen("LayerNormalization")
def _layernorm(c: Case, op: str) -> tuple[list[str], dict, int]:
    x = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(x)
    axis = _rank_axis(c, len(shape))
    norm = shape[axis % len(shape) :]
    if 0 in norm:
        raise Reject("normalizing over nothing")  # onnxruntime refuses it
    inputs = [x, c.fresh(c.dtype(x), norm)]
    if c.rng.random() < 0.5:
        inputs.append(c.fresh(c.dtype(x), norm))
    attrs = {"axis": axis}
    if c.dtype(x) == np.float64:
        # The default float32 stash is where the spec (statistics in float32) and both engines
        # (in float64) part; docs/fuzzing.md.
        attrs["stash_type"] = int(TensorProto.DOUBLE)
    if c.rng.random() < 0.5:
        attrs["epsilon"] = float(c.rng.choice([1e-5, 1e-3, 0.1]))
    return inputs, attrs, 1


@gen("BatchNormalization")
def _batchnorm(c: Case, op: str) -> tuple[list[str], dict, int]:
    x = c.pick(schema_dtypes(op, 0, c.opset), min_rank=2)
    ch = c.shape(x)[1]
    dtype = c.dtype(x)
    scale, bias, mean = (c.fresh(dtype, (ch,)) for _ in range(3))
    var = c.fresh(dtype, (ch,), low=0.1, high=2.0, finite=True)
    return [x, scale, bias, mean, var], {"epsilon": float(c.rng.choice([1e-5, 0.01]))}, 1


@gen("InstanceNormalization")
def _instancenorm(c: Case, op: str) -> tuple[list[str], dict, int]:
    x = c.pick(schema_dtypes(op, 0, c.opset), min_rank=3, min_dim=1)
    ch = c.shape(x)[1]
    return [x, c.fresh(c.dtype(x), (ch,)), c.fresh(c.dtype(x), (ch,))], {}, 1


@gen("LpNormalization")
def _lpnorm(c: Case, op: str) -> tuple[list[str], dict, int]:
    x = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    return [x], {"axis": _rank_axis(c, len(c.shape(x))), "p": int(c.rng.integers(1, 3))}, 1


# ---------------------------------------------------------------- more indexing and tensor ops
@gen("GatherND")
def _gather_nd(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1, min_dim=1)
    shape = c.shape(a)
    batch = int(c.rng.integers(0, len(shape)))
    depth = int(c.rng.integers(1, len(shape) - batch + 1))
    lead = c.dims(int(c.rng.integers(0, 2)), min_dim=1)
    ishape = (*shape[:batch], *lead, depth)
    idx = np.stack(
        [
            c.rng.integers(-shape[batch + k], shape[batch + k], size=ishape[:-1])
            for k in range(depth)
        ],
        axis=-1,
    ).astype(np.int64)
    name = c.name("i")
    (c.initializers if c.rng.random() < 0.3 else c.inputs)[name] = idx
    c.values[name] = Value(np.int64, idx.shape, name in c.initializers)
    return [a, name], {"batch_dims": batch}, 1


@gen("ScatterElements")
def _scatter_elements(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1, min_dim=1)
    shape = c.shape(a)
    axis = _rank_axis(c, len(shape))
    reduction = str(c.rng.choice(["none", "none", "add", "mul", "max", "min"]))
    ushape = tuple(int(c.rng.integers(1, d + 1)) for d in shape)
    n = shape[axis]
    if reduction == "none":
        # Distinct targets per line: with duplicates the winner is unspecified.
        along = ushape[axis % len(shape)]
        perm = np.stack(
            [c.rng.permutation(n)[:along] for _ in range(int(np.prod(ushape)) // along)]
        )
        idx = np.moveaxis(
            perm.reshape(*[d for i, d in enumerate(ushape) if i != axis % len(shape)], along),
            -1,
            axis % len(shape),
        )
    else:
        idx = c.rng.integers(0, n, size=ushape)
    idx = np.where(c.rng.random(idx.shape) < 0.3, idx - n, idx).astype(np.int64)
    name = c.name("i")
    c.inputs[name] = idx
    c.values[name] = Value(np.int64, idx.shape, False)
    updates = c.fresh(c.dtype(a), idx.shape)
    return [a, name, updates], {"axis": axis, "reduction": reduction}, 1


@gen("OneHot")
def _one_hot(c: Case, op: str) -> tuple[list[str], dict, int]:
    depth_value = int(c.rng.integers(1, 5))
    # Integer indices: onnxruntime has no kernel for float ones and the reference evaluator
    # mishandles them.
    idx = c.fresh(
        c.rng.choice([np.int64, np.int32]),
        c.dims(int(c.rng.integers(0, 3))),
        low=-depth_value,
        high=depth_value - 1,
    )
    depth = c.const(np.array(depth_value, np.int64))
    values = c.fresh(c.rng.choice([np.float32, np.int64, np.int32]), (2,), init=True, finite=True)
    rank = len(c.shape(idx)) + 1
    return [idx, depth, values], {"axis": int(c.rng.integers(-rank, rank))}, 1


@gen("Einsum")
def _einsum(c: Case, op: str) -> tuple[list[str], dict, int]:
    equation, shapes = [
        ("ij,jk->ik", ["ij", "jk"]),
        ("bij,bjk->bik", ["bij", "bjk"]),
        ("ij->ji", ["ij"]),
        ("ii->i", ["ii"]),
        ("ij,ij->i", ["ij", "ij"]),
        ("i,j->ij", ["i", "j"]),
        ("bhqd,bhkd->bhqk", ["bhqd", "bhkd"]),
        ("ij->", ["ij"]),
        ("...ij,...jk->...ik", ["xij", "xjk"]),
    ][int(c.rng.integers(9))]
    sizes = {letter: int(c.rng.integers(1, 4)) for letter in "ijkbhqdx"}
    dtype = c.rng.choice([np.float32, np.float64, np.int32, np.int64])
    return (
        [c.fresh(dtype, tuple(sizes[x] for x in spec)) for spec in shapes],
        {"equation": equation},
        1,
    )


@gen("Compress")
def _compress(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)
    shape = c.shape(a)
    attrs = {}
    if c.rng.random() < 0.7:
        attrs["axis"] = _rank_axis(c, len(shape))
        n = shape[attrs["axis"]]
    else:
        n = int(np.prod(shape))
    cond = c.const(c.rng.random(int(c.rng.integers(0, n + 1))) < 0.5)
    return [a, cond], attrs, 1


@gen("NonZero")
def _nonzero(c: Case, op: str) -> tuple[list[str], dict, int]:
    return [c.pick(schema_dtypes(op, 0, c.opset), min_rank=1)], {}, 1


@gen("EyeLike")
def _eye_like(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.fresh(c.rng.choice(schema_dtypes(op, 0, c.opset)), c.dims(2))
    attrs: dict = {"k": int(c.rng.integers(-2, 3))}
    if c.rng.random() < 0.5:
        attrs["dtype"] = int(
            helper.np_dtype_to_tensor_dtype(
                np.dtype(c.rng.choice([np.float32, np.int64, np.int32, np.float64]))
            )
        )
    return [a], attrs, 1


@gen("ReverseSequence")
def _reverse_sequence(c: Case, op: str) -> tuple[list[str], dict, int]:
    a = c.pick(schema_dtypes(op, 0, c.opset), min_rank=2, min_dim=1)
    shape = c.shape(a)
    batch_axis = int(c.rng.integers(2))
    time_axis = 1 - batch_axis
    lengths = c.rng.integers(0, shape[time_axis] + 1, size=shape[batch_axis]).astype(np.int64)
    name = c.name("x")
    c.inputs[name] = lengths
    c.values[name] = Value(np.int64, lengths.shape, False)
    return [a, name], {"batch_axis": batch_axis, "time_axis": time_axis}, 1


@gen("Dropout")
def _dropout(c: Case, op: str) -> tuple[list[str], dict, int]:
    # Inference (no training_mode): the identity, and a mask of ones when asked for.
    a = c.pick(schema_dtypes(op, 0, c.opset))
    return [a], {}, int(c.rng.integers(1, 3))


@gen("Det")
def _det(c: Case, op: str) -> tuple[list[str], dict, int]:
    n = int(c.rng.integers(1, 4))
    batch = c.dims(int(c.rng.integers(0, 2)), min_dim=1)
    return (
        [c.fresh(c.rng.choice(schema_dtypes(op, 0, c.opset)), (*batch, n, n), finite=True)],
        {},
        1,
    )


@gen("CastLike")
def _cast_like(c: Case, op: str) -> tuple[list[str], dict, int]:
    to = c.rng.choice([np.float32, np.float64, np.float16, np.int32, np.int64, np.bool_])
    if np.dtype(to).kind in "ib":
        a = c.fresh(
            c.rng.choice([np.float32, np.float64]),
            c.dims(int(c.rng.integers(0, 3))),
            low=-50,
            high=50,
            finite=True,
        )
    else:
        a = c.pick(schema_dtypes(op, 0, c.opset))
    return [a, c.fresh(to, (1,))], {}, 1


@gen("Resize")
def _resize(c: Case, op: str) -> tuple[list[str], dict, int]:
    n, ch = c.dims(2, min_dim=1)
    mode = str(c.rng.choice(["nearest", "linear", "cubic"]))
    # onnxruntime: linear and cubic resize 2 spatial axes only; no float64 kernel (and the
    # reference evaluator's float64 Resize rounds differently).
    spatial = c.dims(2 if mode != "nearest" else int(c.rng.integers(1, 3)), min_dim=1)
    x = c.fresh(np.float32, (n, ch, *spatial))
    attrs: dict = {"mode": mode}
    if mode == "nearest":
        attrs["nearest_mode"] = str(
            c.rng.choice(["round_prefer_floor", "round_prefer_ceil", "floor", "ceil"])
        )
    attrs["coordinate_transformation_mode"] = str(
        c.rng.choice(["half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"])
    )
    if mode == "cubic":
        attrs["cubic_coeff_a"] = -0.75 if c.rng.random() < 0.5 else -0.5
    inputs = [x, ""]
    if c.rng.random() < 0.5:
        scales = [1.0, 1.0] + [float(c.rng.choice([0.5, 1.0, 1.5, 2.0, 3.0])) for _ in spatial]
        inputs.append(c.const(np.array(scales, np.float32)))
    else:
        sizes = [n, ch] + [int(c.rng.integers(1, 2 * d + 2)) for d in spatial]
        inputs += ["", c.const(np.array(sizes, np.int64))]
    return inputs, attrs, 1


# The ops graphs are built from by default.
CORE_OPS = tuple(sorted(GENERATORS))


def add_random_node(c: Case, op: str) -> onnx.NodeProto:
    """Generate and append one valid node of ``op`` (raises Reject when the draw is invalid)."""
    generator = GENERATORS[op]
    inputs, attrs, n_out = generator(c, op)
    node = helper.make_node(
        op, inputs, [c.name("t") for _ in range(n_out)], name=c.name(f"{op}_"), **attrs
    )
    c.add(node)
    return node


def wrap_in_if(c: Case, node: onnx.NodeProto) -> None:
    """Replace the last node by an If whose branches compute it (capturing outer names)."""
    c.nodes.pop()
    outs = list(node.output)
    then_node = onnx.NodeProto()
    then_node.CopyFrom(node)
    else_node = onnx.NodeProto()
    else_node.CopyFrom(node)
    then_outs = [f"{o}_then" for o in outs]
    else_outs = [f"{o}_else" for o in outs]
    del then_node.output[:]
    then_node.output.extend(then_outs)
    del else_node.output[:]
    else_node.output.extend(else_outs)
    out_types = [
        helper.make_value_info(n, c.values[o].type) for n, o in zip(then_outs, outs, strict=True)
    ]
    then_graph = helper.make_graph([then_node], "then", [], out_types)
    else_graph = helper.make_graph(
        [else_node],
        "else",
        [],
        [helper.make_value_info(e, t.type) for e, t in zip(else_outs, out_types, strict=True)],
    )
    cond = c.fresh(np.bool_, (), init=c.rng.random() < 0.3)
    wrapper = helper.make_node(
        "If", [cond], outs, name=c.name("If_"), then_branch=then_graph, else_branch=else_graph
    )
    for o in outs:
        del c.values[o]
    c.add(wrapper)


def wrap_in_loop(c: Case, node: onnx.NodeProto) -> None:
    """Replace the last node by a Loop of 1-3 iterations that stacks its outputs."""
    c.nodes.pop()
    outs = list(node.output)
    body_node = onnx.NodeProto()
    body_node.CopyFrom(node)
    body_outs = [f"{o}_body" for o in outs]
    del body_node.output[:]
    body_node.output.extend(body_outs)
    cond_out = helper.make_node("Identity", ["cond_in"], ["cond_out"])
    body = helper.make_graph(
        [body_node, cond_out],
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])]
        + [
            helper.make_value_info(b, c.values[o].type)
            for b, o in zip(body_outs, outs, strict=True)
        ],
    )
    trips = c.const(np.array(int(c.rng.integers(1, 4)), np.int64))
    cond = c.const(np.array(True))
    wrapper = helper.make_node("Loop", [trips, cond], outs, name=c.name("Loop_"), body=body)
    for o in outs:
        del c.values[o]
    c.add(wrapper)


def random_case(
    rng: np.random.Generator, ops: list[str], *, max_nodes: int = 6, attempts: int = 60
) -> Case:
    """A random graph of 1 to ``max_nodes`` nodes drawn from ``ops``."""
    case = Case(rng, special=rng.random() < 0.15)
    target = int(rng.integers(1, max_nodes + 1))
    for _ in range(attempts):
        if len(case.nodes) >= target:
            break
        op = str(rng.choice(ops))
        saved = (list(case.nodes), dict(case.inputs), dict(case.initializers), dict(case.values))
        try:
            node = add_random_node(case, op)
            roll = rng.random()
            if roll < 0.06:
                wrap_in_if(case, node)
            elif roll < 0.1:
                wrap_in_loop(case, node)
        except Reject:
            case.nodes, case.inputs, case.initializers, case.values = (
                saved[0],
                saved[1],
                saved[2],
                saved[3],
            )
    if not case.nodes:
        raise Reject("no node could be generated")
    return case
