"""Per-dtype tolerances, in one table, that a backend may widen or tighten per operation.

A result ``got`` passes against the float64 oracle ``want`` when
``|got - want| <= atol + rtol * |want|`` everywhere. The oracle is computed
from the values the backend actually stored (and the query rounded to its
dtype), so these bounds cover accumulation and output rounding only.
"""

from __future__ import annotations

from pagedkv_core.contract.backend import Capabilities

__all__ = ["DEFAULT_TOLERANCES", "OPERATION_TOLERANCES", "tolerance"]

DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-10, 1e-10),
    "float32": (3e-5, 3e-5),
    "float16": (3e-3, 3e-3),
    "bfloat16": (2e-2, 2e-2),
    "int8": (3e-5, 3e-5),  # against the oracle on the dequantized pool, float32 query
    "float8_e4m3fn": (3e-5, 3e-5),
}


# Operations whose error is not the dtype's rounding but a declared loss.
OPERATION_TOLERANCES: dict[tuple[str, str], tuple[float, float]] = {
    # attention over an int8 pool vs the same data in float32 (unit-normal K/V, head dim 64)
    ("int8_vs_float32", "int8"): (0.05, 0.05),
}


def tolerance(capabilities: Capabilities, operation: str, dtype: str) -> tuple[float, float]:
    """(atol, rtol) for ``operation`` on ``dtype``: the backend's override, else the tables."""
    if (operation, dtype) in capabilities.tolerances:
        return capabilities.tolerances[(operation, dtype)]
    return OPERATION_TOLERANCES.get((operation, dtype), DEFAULT_TOLERANCES[dtype])
