"""Layout transforms between HF tensors and ours, on weights larger than one band of the blocked transpose."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from eu_jax.convert.keymap import COPY, FLAT, LINEAR


@pytest.mark.parametrize("out_features", [1, 128, 300])
def test_linear_layout_casts_and_transposes_like_numpy(out_features):
    """A bf16 [out, in] HF weight lands in fp32 [in, heads, head_dim] exactly as numpy's plain transpose puts it."""
    rng = np.random.default_rng(out_features)
    hf = rng.standard_normal((out_features, 6)).astype(ml_dtypes.bfloat16)
    ours = np.full((6, out_features, 1), np.nan, np.float32)
    LINEAR.to_ours_into(hf, ours)
    np.testing.assert_array_equal(ours, hf.astype(np.float32).T.reshape(6, out_features, 1))
    back = LINEAR.to_hf(ours, hf.shape, np.dtype(ml_dtypes.bfloat16))
    assert back.dtype == ml_dtypes.bfloat16 and back.flags.c_contiguous
    np.testing.assert_array_equal(back.view(np.uint16), hf.view(np.uint16))


def test_copy_and_flat_layouts_only_reshape_and_cast():
    hf = np.arange(12, dtype=np.float16)
    ours = np.empty((3, 4), np.float32)
    FLAT.to_ours_into(hf, ours)
    np.testing.assert_array_equal(ours, hf.astype(np.float32).reshape(3, 4))
    np.testing.assert_array_equal(FLAT.to_hf(ours, (12,), np.dtype(np.float16)), hf)
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    copied = np.empty_like(table)
    COPY.to_ours_into(table, copied)
    np.testing.assert_array_equal(copied, table)
    np.testing.assert_array_equal(COPY.to_hf(copied, (4, 3), np.dtype(np.float32)), table)


@pytest.mark.parametrize("layout", [LINEAR, COPY])
def test_same_dtype_layouts_move_bf16_bits_unchanged(layout):
    """An import keeping bf16 moves raw bits: NaN payloads, -0 and subnormals come through as they were."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**16, size=(300, 6), dtype=np.uint16)
    bits[0, :3] = [0x7FC1, 0x8000, 0x0001]  # a NaN with a payload, -0, the smallest subnormal
    hf = bits.view(ml_dtypes.bfloat16)
    expected = bits.T if layout is LINEAR else bits
    ours = np.empty(expected.shape, ml_dtypes.bfloat16)
    layout.to_ours_into(hf, ours)
    np.testing.assert_array_equal(ours.view(np.uint16), expected)
    back = layout.to_hf(ours, hf.shape, np.dtype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(back.view(np.uint16), bits)


@pytest.mark.parametrize("dtype", [np.int8, ml_dtypes.bfloat16, np.float16, np.float32, np.float64])
@pytest.mark.parametrize("rows, cols", [(7, 1032), (130, 24), (3, 6)])
def test_linear_layout_transposes_bits_of_every_width_like_numpy(dtype, rows, cols):
    """Same-dtype transposes of 1 to 8-byte elements (moved as 16 or 8-byte words where the rows' bytes
    allow, several scratch chunks at 1032 columns) and of a column slice of a wider array equal numpy's `.T`,
    bit for bit (random bits: NaN payloads included)."""
    itemsize = np.dtype(dtype).itemsize
    bits_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
    wide = np.random.default_rng(rows).integers(0, 2 ** (8 * itemsize), size=(rows, cols + 8), dtype=bits_dtype)
    for hf_bits in (wide[:, :cols], np.ascontiguousarray(wide[:, :cols])):
        ours = np.empty((cols, rows), dtype)
        LINEAR.to_ours_into(hf_bits.view(dtype), ours)
        np.testing.assert_array_equal(ours.view(bits_dtype), hf_bits.T)
        back = LINEAR.to_hf(ours, (rows, cols), np.dtype(dtype))
        np.testing.assert_array_equal(back.view(bits_dtype), hf_bits)
