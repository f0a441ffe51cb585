"""LoRA: low-rank adapters on chosen MatMul, Gemm, Conv and MatMulNBits weights of a model.

Each targeted weight ``W`` gets two small factors, ``a`` (inputs x rank, random) and ``b``
(rank x outputs, zero at the start), and the model computes as with ``W + alpha / rank * a @ b``
(laid out as ``W``: transposed for ``Gemm(transB=1)``, reshaped for Conv). Only the factors
train. :meth:`LoRA.apply` runs a MatMul or Gemm target as a side branch, ``x @ W + alpha /
rank * (x @ a) @ b`` (adapter nodes after the node, in :attr:`LoRA.plan`), so a step holds no
copy of ``W`` and no weight-sized gradient; a Conv target, or a weight some other node also
reads, is folded into a copy of its weight instead. :meth:`LoRA.merge` folds every dense
target into its weight, and :meth:`LoRA.save` writes them folded: the original graph and no
extra nodes.

A com.microsoft ``MatMulNBits`` weight (onnxruntime's 2/4/8-bit block format, QLoRA-style)
stays packed and frozen: a uint8 param (a constant when under 1 KiB) that ``train`` never
selects, so neither the gradient nor the optimizer state holds it. Its adapters add
``alpha / rank * (x @ a) @ b`` to the node's output (after its bias), as explicit MatMul, Mul
and Add nodes in :attr:`LoRA.plan`, as the dense targets' are. :meth:`LoRA.save`
writes those nodes into the file by default (``merge=False``): onnxruntime then computes what
was trained, and the base bytes stay exactly as they were. ``merge=True`` re-quantizes
``W + delta`` in the file's block format instead (same graph, no extra nodes), which costs the
4-bit rounding error once more (:meth:`LoRA.requantize` reports it) and can round away an
update smaller than a step.

Example:
    >>> import jax, numpy as np, onnx2jax
    >>> from onnx2jax.train.lora import LoRA
    >>> model = onnx2jax.load(onnx2jax.example_path())
    >>> lora = LoRA(model, targets="/4/*", rank=2)     # the second Conv, by node name
    >>> adapters = lora.init(jax.random.key(0))
    >>> sorted(adapters)
    ['onnx::Conv_31::lora_a', 'onnx::Conv_31::lora_b']
    >>> params = {**model.params, **adapters}
    >>> x = np.ones((1, 1, 8, 8), np.float32)
    >>> bool(np.allclose(lora.apply(params, x)["logits"], model(x)["logits"], atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import onnx

from onnx2jax.core import export
from onnx2jax.core.errors import InputError
from onnx2jax.core.graph import GraphPlan, TensorInfo
from onnx2jax.core.loader import data_files_named
from onnx2jax.core.model import Model, Params
from onnx2jax.ops.blockwise_quant import dequantize_nbits, pack_low_first
from onnx2jax.ops.registry import MS, canonical_domain, lookup

A_SUFFIX = "::lora_a"
B_SUFFIX = "::lora_b"
SCALE_SUFFIX = "::lora_scale"
Targets = (
    str | re.Pattern[str] | Callable[[str, onnx.NodeProto], bool] | Sequence[str | re.Pattern[str]]
)


@dataclass(frozen=True)
class Target:
    """One adapted weight: its name, the node that uses it, and its layout.

    For a MatMulNBits weight (``packed``) ``weight`` is the packed ``B`` initializer and
    ``shape`` the logical ``(N, K)``; ``output`` names the node's first output.
    """

    weight: str
    node: str
    op_type: str
    shape: tuple[int, ...]
    fan_in: int
    fan_out: int
    transposed: bool  # the weight is laid out (outputs, inputs...) rather than (inputs, outputs)
    output: str = ""

    @property
    def packed(self) -> bool:
        """A MatMulNBits weight: packed, frozen, adapted at the node's output."""
        return self.op_type == "MatMulNBits"


@dataclass(frozen=True)
class Requantized:
    """:meth:`LoRA.requantize`'s result for the MatMulNBits targets.

    ``tensors``: the new values of each target's packed ``B``, scales and zero points, by
    initializer name, in the file's shapes and dtypes. ``error``: per target weight, the
    largest ``|dequantized - (W + delta)|`` of the re-quantized weight. ``step``: per target
    weight, its largest block scale (one quantization step), the scale ``error`` compares to.
    """

    tensors: dict[str, np.ndarray]
    error: dict[str, float]
    step: dict[str, float]


class LoRA:
    """Low-rank adapters for the weights of ``model`` that ``targets`` picks.

    ``targets`` is a glob, a compiled regex (searched), a list of these, or a function of
    ``(weight_name, node)``; globs and regexes match the weight's initializer name or the name
    of the MatMul/Gemm/Conv/MatMulNBits node using it (exporters often give weights names like
    ``onnx::MatMul_717`` but nodes names like ``/encoder/layer.0/attention/self/query/MatMul``).
    The scale is ``alpha / rank`` (``alpha`` defaults to ``rank``).

    Example:
        >>> import onnx2jax
        >>> model = onnx2jax.load(onnx2jax.example_path())
        >>> [t.op_type for t in LoRA(model, targets="*", rank=4).targets]
        ['Conv', 'Conv', 'Gemm']
    """

    def __init__(self, model: Model, targets: Targets, rank: int = 8, alpha: float | None = None):
        if rank < 1:
            raise InputError(f"LoRA rank must be at least 1, got {rank}")
        self.model = model
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scale = self.alpha / rank
        self.targets = [t for t in _eligible(model) if _matches(targets, t, model)]
        if not self.targets:
            names = [f"{t.weight} ({t.node})" for t in _eligible(model)[:5]]
            raise InputError(
                f"LoRA targets {targets!r} match no MatMul/Gemm/Conv/MatMulNBits weight; "
                f"eligible weights (and nodes) look like {names}"
            )
        self._sites = _branch_sites(model, self.targets)
        self.plan: GraphPlan = self._adapted_plan()
        """The plan :meth:`apply` runs: the model's, with adapter nodes after each node that
        reads a MatMul, Gemm or MatMulNBits target (for MatMulNBits, the nodes
        ``save(merge=False)`` writes)."""

    @property
    def adapter_names(self) -> list[str]:
        """The names of the adapter params, two per target."""
        return [t.weight + s for t in self.targets for s in (A_SUFFIX, B_SUFFIX)]

    def init(self, key: jax.Array) -> Params:
        """Fresh adapters: ``a`` uniform in ``±1/sqrt(fan_in)``, ``b`` zero (so no change yet).

        The factors are float32 (float64 for float64 weights) whatever the weight's dtype.
        """
        adapters = {}
        for target, subkey in zip(
            self.targets, jax.random.split(key, len(self.targets)), strict=True
        ):
            dtype = jnp.promote_types(self._weight_dtype(target), jnp.float32)
            bound = 1.0 / math.sqrt(target.fan_in)
            adapters[target.weight + A_SUFFIX] = jax.random.uniform(
                subkey, (target.fan_in, self.rank), dtype, -bound, bound
            )
            adapters[target.weight + B_SUFFIX] = jnp.zeros((self.rank, target.fan_out), dtype)
        return adapters

    def merge(self, params: Mapping[str, Any]) -> Params:
        """The model's params with the adapters folded in: ready for ``model.apply``/``save``.

        ``params`` holds the model's params and the adapters (``{**model.params, **adapters}``);
        the result has exactly the model's keys, each weight in its original dtype. A packed
        MatMulNBits weight holds integers, not floats, so its adapters cannot be folded into
        it: use :meth:`apply`, and :meth:`save` (either way) or :meth:`requantize`.
        """
        packed = [t.weight for t in self.targets if t.packed]
        if packed:
            raise InputError(
                f"the MatMulNBits weights {packed[:3]} are packed integers, not floats: their "
                "adapters cannot be merged into params; run lora.apply, and write them with "
                "lora.save(path, params) (adapter nodes) or lora.save(path, params, merge=True) "
                "(re-quantized)"
            )
        return self._folded(params, self.targets)

    def apply(
        self,
        params: Mapping[str, Any],
        *inputs: Any,
        outputs: Sequence[str] | str | None = None,
        **named_inputs: Any,
    ) -> dict[str, Any]:
        """``model.apply`` with the adapters of ``params``: pure and jittable.

        MatMul, Gemm and MatMulNBits targets run through the adapter nodes of :attr:`plan`
        (``x @ W + scale * (x @ a) @ b``), their weights as they are: no copy of a weight, and
        the adapters' gradients come from rank-sized products. Conv targets, and a weight that
        some other node also reads, run merged into their weights.
        """
        self._check(params)
        values = {**self._folded(params, self._merged_targets()), **self._branch_values(params)}
        bound = self.model.bind_inputs(inputs, named_inputs)
        wanted = (outputs,) if isinstance(outputs, str) else outputs
        return self.model.apply_plan(
            self.plan, values, bound, None if wanted is None else tuple(wanted)
        )

    def save(
        self,
        path: str | os.PathLike,
        params: Mapping[str, Any],
        *,
        merge: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Write the tuned model to ``path`` (keywords as ``Model.save``), for any ONNX runtime.

        Dense targets are merged into their weights (as :meth:`merge` does, whatever
        ``merge`` says): the original graph with updated weights.
        MatMulNBits targets, by default (``merge=False``), are written as the adapter nodes of
        :attr:`plan` with ``a``, ``b`` and the scale as float initializers: onnxruntime then
        computes what was trained, and the packed base keeps its bytes. With ``merge=True``
        they are re-quantized into the node's own block format instead (:meth:`requantize`):
        the original graph, but with the rounding error of the format once more.
        """
        self._check(params)
        dense = [t for t in self.targets if not t.packed]
        if len(dense) == len(self.targets):
            return self.model.save(path, self._folded(params, dense), **kwargs)
        proto = self.model.to_onnx(self._folded(params, dense))
        graph = proto.graph
        if merge:
            tensors = self.requantize(params).tensors
            for index, tensor in enumerate(graph.initializer):
                if tensor.name in tensors:
                    graph.initializer[index].CopyFrom(
                        onnx.numpy_helper.from_array(tensors[tensor.name], tensor.name)
                    )
        else:
            adapters = self._branch_values(params, packed_only=True)
            for target in (t for t in self.targets if t.packed):
                at = next(i for i, n in enumerate(graph.node) if target.output in n.output[:1])
                replacement = self._adapter_nodes(target, graph.node[at], [])
                del graph.node[at]
                for offset, node in enumerate(replacement):
                    graph.node.insert(at + offset, node)
            for name, value in adapters.items():
                graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        self._check_keeps_model_data(Path(path))
        return export.save(_Written(proto, self, params), path, **kwargs)

    def requantize(self, params: Mapping[str, Any]) -> Requantized:
        """Each MatMulNBits target's ``W + alpha / rank * (a @ b).T`` quantized again in its
        node's format (bits, block size, zero points or none), as ``save(merge=True)`` writes.

        With zero points each block is asymmetric (min and max of the block and zero); without,
        symmetric around the default zero point ``2^(bits-1)``, as onnxruntime's quantizer does.
        ``g_idx`` (act-order) weights and float zero points are refused.
        """
        tensors: dict[str, np.ndarray] = {}
        errors: dict[str, float] = {}
        steps: dict[str, float] = {}
        for target in (t for t in self.targets if t.packed):
            node = self._node(target)
            names = [*node.input, "", "", ""]
            if names[4]:
                raise InputError(
                    f"{target.node}: a MatMulNBits weight with g_idx cannot be re-quantized; "
                    "save with merge=False"
                )
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            bits, block = int(attrs.get("bits", 4)), int(attrs["block_size"])
            n, k = target.shape
            packed = self._value(names[1])
            scales = self._value(names[2])
            zero_points = self._value(names[3]) if names[3] else None
            if zero_points is not None and zero_points.dtype != np.uint8:
                raise InputError(
                    f"{target.node}: float zero points cannot be re-quantized; save with "
                    "merge=False"
                )
            base = np.asarray(
                dequantize_nbits(
                    _Errors(target.node), packed, scales, zero_points, None, n, k, bits, block
                )
            )
            delta = (
                self.scale
                * np.asarray(params[target.weight + A_SUFFIX])
                @ np.asarray(params[target.weight + B_SUFFIX])
            )
            weight = base.astype(np.float32) + delta.T.astype(np.float32)
            q, new_scales, new_zero = quantize_blocks(weight, bits, block, zero_points is not None)
            tensors[names[1]] = pack_low_first(q, bits).reshape(packed.shape)
            tensors[names[2]] = new_scales.astype(scales.dtype).reshape(scales.shape)
            if zero_points is not None:
                per_row = -(-new_zero.shape[1] * bits // 8)
                padded = np.zeros((n, per_row * 8 // bits), np.int32)
                padded[:, : new_zero.shape[1]] = new_zero
                tensors[names[3]] = pack_low_first(padded, bits).reshape(zero_points.shape)
            again = np.asarray(
                dequantize_nbits(
                    _Errors(target.node),
                    tensors[names[1]],
                    tensors[names[2]],
                    tensors.get(names[3]),
                    None,
                    n,
                    k,
                    bits,
                    block,
                )
            )
            errors[target.weight] = float(np.abs(again - weight).max())
            steps[target.weight] = float(np.abs(tensors[names[2]]).max())
        return Requantized(tensors, errors, steps)

    # ------------------------------------------------------------------------------ helpers
    def _check(self, params: Mapping[str, Any]) -> None:
        missing = [k for k in (*self.model.params, *self.adapter_names) if k not in params]
        if missing:
            raise InputError(
                f"params lack {len(missing)} name(s) (first: {missing[:3]}); pass "
                "{**model.params, **adapters}"
            )

    def _check_keeps_model_data(self, path: Path) -> None:
        """Refuse to replace a file whose external data the model still reads: the save
        removes the data files of the file it replaces, and only the model itself (not the
        proto built here) tells ``export.save`` which of them to keep."""
        if self.model.base_dir is None or not path.is_file():
            return
        read = data_files_named(self.model.proto, self.model.base_dir)
        if read & data_files_named(onnx.load(str(path), load_external_data=False), path.parent):
            raise InputError(
                f"{path} holds its weights in data files the model still reads; "
                "save the tuned model under another name"
            )

    def _merged_targets(self) -> list[Target]:
        """The targets :meth:`apply` folds into their weights: those with no adapter nodes."""
        branched = {t.weight for t, _ in self._sites.values()}
        return [t for t in self.targets if t.weight not in branched]

    def _folded(self, params: Mapping[str, Any], targets: Sequence[Target]) -> Params:
        """The model's params, with the adapters of ``targets`` (dense ones) folded into
        their weights."""
        merged = {k: v for k, v in params.items() if k in self.model.params}
        for target in targets:
            a = params[target.weight + A_SUFFIX]
            b = params[target.weight + B_SUFFIX]
            delta = self.scale * (a @ b)
            if target.transposed:
                delta = delta.T
            weight = merged[target.weight]
            merged[target.weight] = (weight + delta.reshape(target.shape)).astype(weight.dtype)
        return merged

    def _branch_values(
        self, params: Mapping[str, Any], packed_only: bool = False
    ) -> dict[str, Any]:
        """The adapters and scales the adapter nodes read (only the MatMulNBits targets' with
        ``packed_only``)."""
        values: dict[str, Any] = {}
        for target, node in self._sites.values():
            if packed_only and not target.packed:
                continue
            a = params[target.weight + A_SUFFIX]
            values[target.weight + A_SUFFIX] = a
            values[target.weight + B_SUFFIX] = params[target.weight + B_SUFFIX]
            name, scale = self._site_scale(target, node)
            values[name] = np.asarray(scale, np.dtype(a.dtype))
        return values

    def _site_scale(self, target: Target, node: onnx.NodeProto) -> tuple[str, float]:
        """The name and value of the scale ``node``'s adapter nodes multiply by: ``alpha /
        rank``, times a Gemm's own ``alpha`` (named after the node when that is not 1)."""
        factor = 1.0
        if node.op_type == "Gemm":
            factor = float(_attrs(node).get("alpha", 1.0))
        if factor == 1.0:
            return target.weight + SCALE_SUFFIX, self.scale
        return f"{node.output[0]}{SCALE_SUFFIX}", self.scale * factor

    def _node(self, target: Target) -> onnx.NodeProto:
        return next(n for n in self.model.plan.nodes if n.output[:1] == [target.output])

    def _value(self, name: str) -> np.ndarray:
        """An initializer's value: a constant of the plan, or a param."""
        if name in self.model.plan.constants:
            return np.asarray(self.model.plan.constants[name])
        return np.asarray(self.model.params[name])

    def _weight_dtype(self, target: Target) -> Any:
        if target.packed:
            return self._value(self._node(target).input[2]).dtype
        return self.model.params[target.weight].dtype

    def _adapter_nodes(
        self, target: Target, node: onnx.NodeProto, names: Sequence[str]
    ) -> list[onnx.NodeProto]:
        """``node`` (a MatMul, Gemm or MatMulNBits reading ``target``) with its output renamed,
        then the nodes that add ``(x @ a) @ b * scale`` to it under the original output name
        (in float32, cast back for a float16 or bfloat16 node). ``x`` is the node's first
        input, transposed for ``Gemm(transA=1)``. The new tensors are named after the target's
        weight, or after the node's output when ``names`` (the tensor names taken so far)
        already holds them: a weight that several nodes read."""
        base = onnx.NodeProto()
        base.CopyFrom(node)
        out = node.output[0]
        base.output[0] = f"{out}::lora_base"
        prefix = target.weight if f"{target.weight}::lora_xa" not in names else out
        name = node.name or out
        dtype = np.dtype(self._weight_dtype(target))
        x = node.input[0]
        nodes = [base]
        if node.op_type == "Gemm" and _attrs(node).get("transA", 0):
            nodes.append(
                onnx.helper.make_node("Transpose", [x], [f"{prefix}::lora_xt"], f"{name}/lora_t")
            )
            x = f"{prefix}::lora_xt"
        low = dtype.itemsize < 4
        if low:
            nodes.append(
                onnx.helper.make_node(
                    "Cast",
                    [x],
                    [f"{prefix}::lora_x"],
                    f"{name}/lora_cast_in",
                    to=onnx.TensorProto.FLOAT,
                )
            )
            x = f"{prefix}::lora_x"
        delta = f"{prefix}::lora_delta"
        nodes += [
            onnx.helper.make_node(
                "MatMul", [x, target.weight + A_SUFFIX], [f"{prefix}::lora_xa"], f"{name}/lora_a"
            ),
            onnx.helper.make_node(
                "MatMul",
                [f"{prefix}::lora_xa", target.weight + B_SUFFIX],
                [f"{prefix}::lora_xab"],
                f"{name}/lora_b",
            ),
            onnx.helper.make_node(
                "Mul",
                [f"{prefix}::lora_xab", self._site_scale(target, node)[0]],
                [delta],
                f"{name}/lora_scale",
            ),
        ]
        if low:
            nodes.append(
                onnx.helper.make_node(
                    "Cast",
                    [delta],
                    [f"{delta}_cast"],
                    f"{name}/lora_cast_out",
                    to=onnx.helper.np_dtype_to_tensor_dtype(dtype),
                )
            )
            delta = f"{delta}_cast"
        nodes.append(
            onnx.helper.make_node("Add", [base.output[0], delta], [out], f"{name}/lora_add")
        )
        return nodes

    def _adapted_plan(self) -> GraphPlan:
        plan = self.model.plan
        if not self._sites:
            return plan
        nodes, specs, reads = [], [], []
        taken: set[str] = set()
        for node, spec, node_reads in zip(plan.nodes, plan.specs, plan.node_reads, strict=True):
            site = self._sites.get(node.output[0]) if node.output else None
            if site is None:
                nodes.append(node)
                specs.append(spec)
                reads.append(node_reads)
                continue
            for new in self._adapter_nodes(site[0], node, taken):
                domain = canonical_domain(new.domain)
                nodes.append(new)
                specs.append(
                    spec
                    if new.op_type == node.op_type
                    else lookup(domain, new.op_type, self.model.opsets.get(domain, 1))
                )
                reads.append([n for n in new.input if n])
                taken.update(new.output)
        producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
        return dataclasses.replace(
            plan, nodes=nodes, specs=specs, node_reads=reads, producer=producer
        )


def quantize_blocks(
    weight: np.ndarray, bits: int, block: int, asymmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``weight`` [N, K] along K in blocks of ``block``: ``(q, scales, zero_points)``,
    q [N, blocks * block] (K padded with zeros), scales and zero points [N, blocks].

    Asymmetric blocks span their min and max (and zero): each value within half a step.
    Symmetric ones put the value of the largest magnitude at the end of the range, around the
    zero point ``2^(bits-1)``, as onnxruntime's quantizer does: values of the other sign beyond
    ``2^(bits-1) - 1`` steps clip, within one step.

    Example:
        >>> w = np.array([[0.0, 1.0, 2.0, 3.0] * 4], np.float32)
        >>> q, s, z = quantize_blocks(w, 4, 16, asymmetric=True)
        >>> q[0, :4].tolist(), s.tolist(), z.tolist()
        ([0, 5, 10, 15], [[0.20000000298023224]], [[0]])
    """
    n, k = weight.shape
    blocks = -(-k // block)
    padded = np.zeros((n, blocks * block), np.float32)
    padded[:, :k] = weight
    values = padded.reshape(n, blocks, block)
    top = (1 << bits) - 1
    if asymmetric:
        low = np.minimum(values.min(-1), 0)
        high = np.maximum(values.max(-1), 0)
        scales = (high - low) / np.float32(top)
        scales = np.where(scales == 0, np.float32(1), scales).astype(np.float32)
        zero = np.clip(np.round(-low / scales), 0, top)
    else:
        largest = np.take_along_axis(values, np.abs(values).argmax(-1)[..., None], -1)[..., 0]
        scales = (largest / -np.float32(1 << (bits - 1))).astype(np.float32)
        scales = np.where(scales == 0, np.float32(1), scales).astype(np.float32)
        zero = np.full(scales.shape, 1 << (bits - 1), np.float32)
    q = np.clip(np.round(values / scales[..., None]) + zero[..., None], 0, top)
    return q.reshape(n, blocks * block).astype(np.int32), scales, zero.astype(np.int32)


class _Errors:
    """The ``ctx`` of ``dequantize_nbits``, whose errors name the target's node."""

    def __init__(self, node: str):
        self.node = node

    def error(self, message: str) -> InputError:
        return InputError(f"MatMulNBits node {self.node!r}: {message}")


class _Written:
    """What ``export.save`` reads of a model (``export.ModelLike``), for the proto
    :meth:`LoRA.save` built: stand-alone (external data read in), compared with
    :meth:`LoRA.apply` of the tuned params when ``verify`` asks."""

    def __init__(self, proto: onnx.ModelProto, lora: LoRA, params: Mapping[str, Any]):
        self.proto = proto
        self.params: dict[str, Any] = {}
        self.released_weights: dict[str, Any] = {}
        self.base_dir: Path | None = lora.model.base_dir
        self._lora = lora
        self._tuned = dict(params)

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._lora.model.inputs

    def apply(self, params: Mapping[str, Any], *inputs: Any, **named_inputs: Any) -> dict[str, Any]:
        return self._lora.apply(self._tuned, *inputs, **named_inputs)


def _eligible(model: Model) -> list[Target]:
    """The 2-D MatMul/Gemm weights and Conv weights that are params, and the packed weights of
    MatMulNBits nodes that only that node reads; first use of each."""
    found: dict[str, Target] = {}
    readers: dict[str, int] = {}
    for reads in model.plan.node_reads:
        for name in set(reads):
            readers[name] = readers.get(name, 0) + 1
    for node in model.plan.nodes:
        if (
            node.op_type == "MatMulNBits"
            and canonical_domain(node.domain) == MS
            and len(node.input) >= 3
            and node.output
            and (node.input[1] in model.params or node.input[1] in model.plan.constants)
            and readers.get(node.input[1]) == 1
        ):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if "N" not in attrs or "K" not in attrs or "block_size" not in attrs:
                continue
            n, k = int(attrs["N"]), int(attrs["K"])
            found[node.input[1]] = Target(
                node.input[1], node.name, node.op_type, (n, k), k, n, True, node.output[0]
            )
            continue
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight not in model.params or weight in found:
            continue
        shape = tuple(model.params[weight].shape)
        if node.op_type == "Conv":
            if len(shape) < 3:
                continue
            fan_in, fan_out, transposed = math.prod(shape[1:]), shape[0], True
        elif len(shape) != 2:
            continue
        else:
            trans_b = node.op_type == "Gemm" and any(
                a.name == "transB" and a.i for a in node.attribute
            )
            fan_in, fan_out = (shape[1], shape[0]) if trans_b else shape
            transposed = trans_b
        found[weight] = Target(
            weight, node.name, node.op_type, shape, fan_in, fan_out, transposed, node.output[0]
        )
    return list(found.values())


def _branch_sites(
    model: Model, targets: Sequence[Target]
) -> dict[str, tuple[Target, onnx.NodeProto]]:
    """The nodes that get adapter nodes, by first output: each MatMulNBits target's node, and
    every reader of a MatMul or Gemm target when all its readers are MatMul or Gemm nodes that
    read it as their (2-D) weight, all laid out alike; other weights are folded instead."""
    sites: dict[str, tuple[Target, onnx.NodeProto]] = {}
    for target in targets:
        if target.packed:
            sites[target.output] = (
                target,
                next(n for n in model.plan.nodes if n.output[:1] == [target.output]),
            )
            continue
        if target.op_type == "Conv":
            continue
        readers = [
            node
            for node, reads in zip(model.plan.nodes, model.plan.node_reads, strict=True)
            if target.weight in reads
        ]
        if all(_reads_as_weight(node, target) for node in readers):
            sites.update((node.output[0], (target, node)) for node in readers)
    return sites


def _reads_as_weight(node: onnx.NodeProto, target: Target) -> bool:
    """``node`` is a MatMul or Gemm that reads ``target`` as its weight only, laid out as the
    target is (transposed for ``Gemm(transB=1)``)."""
    if canonical_domain(node.domain) != "" or node.op_type not in ("MatMul", "Gemm"):
        return False
    if [i for i, name in enumerate(node.input) if name == target.weight] != [1]:
        return False
    trans_b = node.op_type == "Gemm" and bool(_attrs(node).get("transB", 0))
    return trans_b == target.transposed and bool(node.output)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _matches(targets: Targets, target: Target, model: Model) -> bool:
    if isinstance(targets, str):
        return any(fnmatch.fnmatchcase(n, targets) for n in _names(target, model))
    if isinstance(targets, re.Pattern):
        return any(targets.search(n) for n in _names(target, model))
    if callable(targets):
        node = next(n for n in model.plan.nodes if n.name == target.node)
        return bool(targets(target.weight, node))
    return any(_matches(t, target, model) for t in targets)


def _names(target: Target, model: Model) -> list[str]:
    """The weight's name and the names of every node that reads it."""
    return [target.weight] + [n.name for n in model.plan.nodes if target.weight in n.input]
