"""Capabilities: what a backend declares is usable data, so the other areas can trust it.

A backend that declares no storage dtype would make every dtype-dependent
check skip and the run verify nothing; this area fails it instead.
"""

from __future__ import annotations

import pytest

from pagedkv_core.dtypes import FLOAT_DTYPES, QUANTIZED_DTYPES

pytestmark = pytest.mark.pagedkv_area("capabilities")

KNOWN_KERNELS = {"decode", "prefill", "sliding_window", "soft_cap", "gqa", "chunked_local", "sinks", "cascade"}


def test_declares_storage_dtypes(target):
    caps = target.capabilities
    assert caps.dtypes or caps.quantized, f"{target.id} declares no storage dtype: nothing can be checked"
    assert set(caps.dtypes) <= set(FLOAT_DTYPES), f"unknown float dtypes {set(caps.dtypes) - set(FLOAT_DTYPES)}"
    assert set(caps.quantized) <= set(QUANTIZED_DTYPES), \
        f"unknown quantized dtypes {set(caps.quantized) - set(QUANTIZED_DTYPES)}"


def test_declares_usable_shapes(target):
    caps = target.capabilities
    assert caps.max_head_dim >= 1, f"max_head_dim={caps.max_head_dim}"
    assert caps.block_sizes is None or (caps.block_sizes and all(b >= 1 for b in caps.block_sizes)), \
        f"block_sizes={caps.block_sizes!r}: None (any) or positive sizes"
    assert set(caps.kernels) <= KNOWN_KERNELS, f"unknown kernel features {set(caps.kernels) - KNOWN_KERNELS}"
