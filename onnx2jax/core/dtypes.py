"""ONNX element types and their NumPy/JAX dtypes (float8, int4 and bfloat16 through ml_dtypes)."""

from __future__ import annotations

import numpy as np
import onnx


def numpy_dtype(elem_type: int) -> np.dtype:
    """The NumPy dtype of an ONNX ``TensorProto.DataType`` value."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def onnx_elem_type(dtype: np.dtype) -> int:
    """The ONNX ``TensorProto.DataType`` value of a NumPy dtype."""
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
