"""Shards read from external data (onnx2jax/core/loader.py's read_block): the values of any
block of any stored array, in buffers aligned for XLA to take without a copy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from onnx2jax.core.loader import ALIGNMENT, SMALLEST_RUN, read_block

# The matrix's column halves are runs of SMALLEST_RUN bytes (read run by run), the cube's
# shorter ones (copied from a memory map).
assert 1024 * 4 >= SMALLEST_RUN > 8 * 2

ARRAYS = {
    "scalar": np.float32(3.5).reshape(()),
    "vector": np.arange(5000, dtype=np.int64),
    "matrix": np.arange(64 * 2048, dtype=np.float32).reshape(64, 2048),
    "cube": np.arange(2 * 3 * 40, dtype=np.float16).reshape(2, 3, 40),
}
BLOCKS = {
    "scalar": [()],
    "vector": [(), (slice(1000, 4000),)],
    # Whole rows (one run), column halves (a run per row, read one by one), a corner.
    "matrix": [(slice(8, 16),), (slice(None), slice(1024, 2048)), (slice(3, 9), slice(0, 1024))],
    # Runs shorter than SMALLEST_RUN: copied from a memory map.
    "cube": [(slice(None), slice(1, 3)), (slice(None), slice(None), slice(8, 16)), (slice(1, 2),)],
}


@pytest.mark.parametrize("name", list(ARRAYS))
def test_blocks_equal_numpy_slices_and_are_aligned(name: str, tmp_path: Path):
    value = ARRAYS[name]
    path = tmp_path / "data.bin"
    path.write_bytes(b"head" + value.astype(value.dtype.newbyteorder("<")).tobytes())
    for index in BLOCKS[name]:
        block = read_block(path, 4, value.shape, value.dtype.newbyteorder("<"), index)
        np.testing.assert_array_equal(block, value[index])
        assert block.dtype == value.dtype and block.ctypes.data % ALIGNMENT == 0, index


def test_steps_other_than_one_are_refused(tmp_path: Path):
    path = tmp_path / "data.bin"
    path.write_bytes(np.arange(8, dtype=np.float32).tobytes())
    with pytest.raises(ValueError, match="step 1"):
        read_block(path, 0, (8,), np.dtype("<f4"), (slice(0, 8, 2),))
