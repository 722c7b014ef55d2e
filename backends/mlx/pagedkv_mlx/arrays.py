"""MLX dtypes and devices by pagedkv name, and moving arrays between MLX and NumPy.

MLX arrays are not pinned to a device: an operation runs on the stream of a
device (``mx.cpu`` or ``mx.gpu``), and on Apple silicon both read the same
unified memory. A pagedkv device name therefore selects the stream our
operations run on; :func:`device_probe` says whether this MLX build has it.

NumPy sees an evaluated MLX array through the buffer protocol without a copy
(:func:`host_view`). Such a view aliases the live buffer: MLX may later donate
that buffer to an in-place update, so a view must never outlive the call that
made it (the storage and the host kernel drop theirs before returning).
NumPy has no bfloat16, so bfloat16 crosses as its raw 16 bits (zero-copy) or
as float32 (exact).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from pagedkv_core.contract.backend import Probe
from pagedkv_core.errors import BackendUnavailable, DTypeMismatch, InvalidArgument

__all__ = [
    "DEVICE_NAMES",
    "MX_DTYPES",
    "FLOAT_MX",
    "dtype_name",
    "mx_dtype",
    "device_probe",
    "mlx_device",
    "host_view",
    "to_host",
    "bf16_bits_to_f32",
]

DEVICE_NAMES: tuple[str, ...] = ("cpu", "gpu")

MX_DTYPES: dict[str, Any] = {
    "float32": mx.float32,
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "int8": mx.int8,
}
"""Storage dtypes this backend keeps pools in, by pagedkv name."""

FLOAT_MX = (mx.float32, mx.float16, mx.bfloat16)

_NAMES = {v: k for k, v in MX_DTYPES.items()}


def dtype_name(dtype: Any) -> str:
    """The pagedkv name of an MLX dtype (``str(dtype)`` for the ones pools never hold)."""
    return _NAMES.get(dtype, str(dtype).rsplit(".", 1)[-1])


def mx_dtype(name: str) -> Any:
    """The MLX dtype of a pagedkv dtype name; :class:`DTypeMismatch` for one MLX pools cannot hold."""
    if name == "float64":
        return mx.float64
    if name not in MX_DTYPES:
        raise DTypeMismatch(f"the mlx backend has no dtype {name!r}; it has {', '.join(MX_DTYPES)}")
    return MX_DTYPES[name]


def _gpu_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(mx.metal.is_available() or (cuda is not None and cuda.is_available()))


def device_probe(name: str | None) -> Probe:
    """Whether this MLX build can run on device ``name`` (``None``: on any), and if not, why."""
    if name is None:
        return Probe.ok()
    if name not in DEVICE_NAMES:
        return Probe.missing(f"the mlx backend knows devices {', '.join(DEVICE_NAMES)}, not {name!r}")
    if name == "gpu" and not _gpu_available():
        return Probe.missing(
            f"MLX {mx.__version__} reports no GPU here: its Metal GPU needs macOS on Apple silicon, and this "
            "build has no CUDA backend either (e.g. mlx[cpu] on Linux); the 'cpu' device works"
        )
    return Probe.ok()


def mlx_device(name: str) -> Any:
    """The ``mx.Device`` behind a pagedkv device name, or a typed error saying why there is none."""
    if name not in DEVICE_NAMES:
        raise InvalidArgument(f"the mlx backend knows devices {', '.join(DEVICE_NAMES)}, not {name!r}")
    probe = device_probe(name)
    if not probe.available:
        raise BackendUnavailable("mlx", probe.reason)
    return mx.Device(mx.cpu if name == "cpu" else mx.gpu)


def host_view(array: Any) -> np.ndarray:
    """A zero-copy NumPy view of an MLX array (evaluates it); bfloat16 comes as its uint16 bits.

    The view aliases MLX memory: use it within one call and drop it.
    A row-contiguous bfloat16 array is read through the buffer protocol
    as raw bytes (``np.frombuffer``): reinterpreting it with MLX's own
    ``view(mx.uint16)`` builds and evaluates a graph node, about 25 us per
    call on the cpu device, which the host kernel paid three times a layer
    (query, K pool, V pool). A strided one still goes through ``view``.
    """
    if array.dtype == mx.bfloat16:
        buffer = memoryview(array)  # evaluates a lazy array, as np.array would
        if buffer.c_contiguous:
            return np.frombuffer(buffer, np.uint16).reshape(buffer.shape)
        array = array.view(mx.uint16)
    return np.array(array, copy=False)


def to_host(array: Any) -> np.ndarray:
    """A NumPy copy of an MLX array; bfloat16 becomes float32 (exactly)."""
    if array.dtype == mx.bfloat16:
        array = array.astype(mx.float32)
    return np.array(array)


def bf16_bits_to_f32(bits: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bfloat16 values given as ``uint16`` bits -> float32 (exact: bfloat16 is float32's top half).

    ``out``: a C-contiguous float32 array of ``bits``' shape to convert into
    (the host kernel's tile scratch). The conversion writes the bits into
    ``out`` seen as uint32 and shifts them there, in place: two passes over
    a cache-resident tile and no temporary. Building a widened copy first,
    then a shifted copy, then copying that into ``out``, allocated two
    tile-sized temporaries per call (fresh pages, faulted in each time):
    most of why bfloat16 decode ran at half float32's speed.
    """
    if out is None:
        out = np.empty(bits.shape, np.float32)
    elif out.dtype != np.float32 or out.shape != bits.shape or not out.flags.c_contiguous:
        raise InvalidArgument(f"out must be a C-contiguous float32 array of shape {bits.shape}, "
                              f"got {out.dtype} {out.shape}")
    wide = out.view(np.uint32)
    np.copyto(wide, bits, casting="safe")  # uint16 -> uint32 zero-extends: the bits land in the low half
    wide <<= 16
    return out
