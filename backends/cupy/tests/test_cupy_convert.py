"""Conversions: bfloat16 payloads, int8 quantization, and the host half/bfloat16 code the emulator runs."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from cupy_emulator import build_library

from pagedkv_core.contract import quant
from pagedkv_cupy.convert import (
    bf16_bits_to_float32,
    dequantize_blocks,
    float32_to_bf16_bits,
    float32_to_raw,
    quantize_blocks,
    raw_to_float32,
)

CONVERSIONS = """
extern "C" void pkv_half_to_float(const unsigned short* in, float* out, int n) {
    for (int i = 0; i < n; ++i) out[i] = pkv::half_bits_to_float(in[i]);
}
extern "C" void pkv_float_to_half(const float* in, unsigned short* out, int n) {
    for (int i = 0; i < n; ++i) out[i] = pkv::float_to_half_bits(in[i]);
}
extern "C" void pkv_float_to_bf16(const float* in, unsigned short* out, int n) {
    for (int i = 0; i < n; ++i) out[i] = pkv::float_to_bf16_bits(in[i]);
}
"""


def awkward_floats() -> np.ndarray:
    """Random bit patterns plus every half-precision value, the midpoints between them, and the edges."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=1 << 18, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halves = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    halves = halves[np.isfinite(halves)]
    ordered = np.unique(halves)
    mids = (ordered[:-1].astype(np.float64) + ordered[1:]) / 2
    edges = np.array([0.0, -0.0, np.inf, -np.inf, 65504, 65519.99, 65520, 2.0**-24, 2.0**-25, 2.0**-25 * 1.0001,
                      1e-45, 3.4e38], np.float64)
    return np.concatenate([bits, halves, mids.astype(np.float32), edges.astype(np.float32)])


def same_bits(got: np.ndarray, expected: np.ndarray, nan: np.ndarray) -> None:
    np.testing.assert_array_equal(got[~nan], expected[~nan])


@pytest.fixture(scope="module")
def conversions(emu_kernels):
    return build_library([], emu_kernels.cache_dir, extra=CONVERSIONS)


def call(lib, fn: str, values: np.ndarray, out_dtype) -> np.ndarray:
    out = np.empty(values.shape, out_dtype)
    getattr(lib, fn)(ctypes.c_void_p(values.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int(values.size))
    return out


def test_emulated_half_to_float_is_exact_for_every_payload(conversions):
    payloads = np.arange(2**16, dtype=np.uint16)
    got = call(conversions, "pkv_half_to_float", payloads, np.float32)
    expected = payloads.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert np.isnan(got[nan]).all()
    same_bits(got.view(np.uint32), expected.view(np.uint32), nan)


def test_emulated_float_to_half_rounds_to_nearest_even(conversions):
    values = awkward_floats()
    got = call(conversions, "pkv_float_to_half", values, np.uint16)
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16).view(np.uint16)
    nan = np.isnan(values)
    assert np.isnan(got[nan].view(np.float16)).all()
    same_bits(got, expected, nan)


def test_bfloat16_rounding_agrees_everywhere(conversions):
    values = awkward_floats()
    ours = float32_to_bf16_bits(np, values)
    kernel = call(conversions, "pkv_float_to_bf16", values, np.uint16)
    nan = np.isnan(values)
    np.testing.assert_array_equal(kernel, ours)
    assert np.isnan(bf16_bits_to_float32(np, ours[nan])).all()
    torch = pytest.importorskip("torch", reason="torch gives an independent bfloat16 rounding")
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    same_bits(ours, reference, nan)


def test_bfloat16_payloads_round_trip():
    payloads = np.arange(2**16, dtype=np.uint16)
    values = bf16_bits_to_float32(np, payloads)
    nan = np.isnan(values)
    same_bits(float32_to_bf16_bits(np, values), payloads, nan)
    np.testing.assert_array_equal(raw_to_float32(np, payloads, "bfloat16")[~nan], values[~nan])
    np.testing.assert_array_equal(float32_to_raw(np, values[~nan], "bfloat16"), payloads[~nan])


def test_quantization_matches_the_core_bit_for_bit():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 5, 4, 3, 8)) * rng.uniform(0, 3, size=(2, 5, 1, 3, 1))).astype(np.float32)
    x[0, 1, :, 2] = 0  # an all-zero (block, head) keeps scale 0
    q, scale = quantize_blocks(np, x)
    q_ref, scale_ref = quant.quantize_blocks(x)
    np.testing.assert_array_equal(q, q_ref)
    np.testing.assert_array_equal(scale, scale_ref)
    assert scale[0, 1, 2] == 0
    np.testing.assert_array_equal(dequantize_blocks(np, q, scale), quant.dequantize_blocks(q_ref, scale_ref))
