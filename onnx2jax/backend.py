"""An ``onnx.backend.base.Backend`` so the ONNX backend test suite can run on onnx2jax.

ONNX tensors are 64-bit where the model says so, so the backend runs with JAX's x64 mode on
inside its own calls (a context, never a change of the user's global configuration).

Example:
    >>> import numpy as np, onnx, onnx2jax.backend as backend
    >>> from onnx import helper, TensorProto
    >>> node = helper.make_node("Relu", ["x"], ["y"])
    >>> graph = helper.make_graph([node], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    >>> rep = backend.prepare(helper.make_model(graph))
    >>> rep.run([np.array([-1.0, 2.0], np.float32)])[0]
    array([0., 2.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import onnx
from onnx.backend.base import Backend, BackendRep

from onnx2jax.core.dtypes import onnx_elem_type
from onnx2jax.core.graph import TensorInfo
from onnx2jax.core.model import Model
from onnx2jax.ops.sequence import EmptyOptional


class Onnx2JaxRep(BackendRep):
    """A prepared model: converted once, compiled per input signature, reused across runs."""

    def __init__(self, model: Model):
        self.model = model

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, dict):
            args, named = (), inputs
        elif isinstance(inputs, list | tuple):
            args, named = tuple(inputs), {}
        else:
            args, named = (inputs,), {}
        with jax.enable_x64(True):
            out = self.model(*args, **named)
            return tuple(_to_numpy(out[info.name], info) for info in self.model.outputs)


def _to_numpy(value: Any, info: TensorInfo) -> Any:
    if value is None or isinstance(value, EmptyOptional):
        return None
    if isinstance(value, list):
        element = TensorInfo(info.name, info.elem_type, None)
        return [_to_numpy(v, element) for v in value]
    array = np.asarray(value)
    if info.dtype is not None and array.dtype != info.dtype and array.dtype != object:
        array = array.astype(info.dtype)
    return array


class Onnx2JaxBackend(Backend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> Onnx2JaxRep:
        super().prepare(model, device, **kwargs)
        with jax.enable_x64(True):
            return Onnx2JaxRep(Model(model))

    @classmethod
    def run_node(
        cls,
        node: onnx.NodeProto,
        inputs: Any,
        device: str = "CPU",
        outputs_info: Sequence[tuple[Any, Any]] | None = None,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Run one node on ``inputs`` (a list in the node's input order, or a dict by name)."""
        names = [n for n in node.input if n]
        feeds = dict(inputs) if isinstance(inputs, dict) else dict(zip(names, inputs, strict=False))
        graph = onnx.helper.make_graph(
            [node],
            "run_node",
            [
                onnx.helper.make_tensor_value_info(
                    k, onnx_elem_type(np.asarray(v).dtype), np.shape(v)
                )
                for k, v in feeds.items()
            ],
            [onnx.helper.make_empty_tensor_value_info(n) for n in node.output if n],
        )
        opsets = [
            onnx.helper.make_opsetid(
                node.domain, kwargs.get("opset_version", onnx.defs.onnx_opset_version())
            )
        ]
        if node.domain:
            opsets.append(onnx.helper.make_opsetid("", onnx.defs.onnx_opset_version()))
        with jax.enable_x64(True):  # output types are unknown, so skip the checker here
            rep = Onnx2JaxRep(Model(onnx.helper.make_model(graph, opset_imports=opsets)))
        return rep.run(feeds)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        return device in ("CPU", "CUDA", "GPU", "TPU")


prepare = Onnx2JaxBackend.prepare
run_model = Onnx2JaxBackend.run_model
supports_device = Onnx2JaxBackend.supports_device
