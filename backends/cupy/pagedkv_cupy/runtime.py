"""Where pagedkv meets CUDA: the cupy import, device discovery, device arrays and streams.

Everything the storage and the attention need from the device goes through a
:class:`CudaRuntime` (one per device), so that they read as plain array code
and the tests can drive them with a CPU stand-in. ``cupy`` is imported only
when a runtime is built or a probe runs, never at module import.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pagedkv_core.errors import DeviceMismatch, DTypeMismatch, InvalidArgument, UnsupportedOperation

from .kernels import KernelCache, ModuleKey

__all__ = ["CudaStatus", "CudaRuntime", "cuda_status", "parse_device", "bfloat16_support", "RAW_DTYPES"]

# Storage carrier of each pool dtype: bfloat16 pools are kept as their 16-bit payload.
RAW_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32, "int8": np.int8}
KDL_CUDA = 2  # DLPack device type of CUDA device memory


def import_cupy() -> Any:
    """Import cupy (the one place it happens); ImportError says how to install it."""
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(f"{exc}; install a CuPy wheel: pip install 'pagedkv-cupy[cuda12x]' or '[cuda13x]'") from exc
    return cupy


@dataclass(frozen=True, slots=True)
class CudaStatus:
    """How many GPUs CuPy sees here and, when none, CuPy's own reason."""

    count: int
    reason: str = ""


def cuda_status() -> CudaStatus:
    """Ask CuPy for the visible devices, keeping its error text when it cannot."""
    try:
        cupy = import_cupy()
    except ImportError as exc:
        return CudaStatus(0, f"cupy cannot be imported: {exc}")
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError (no driver, no device) or a missing CUDA library
        return CudaStatus(0, f"{type(exc).__name__}: {exc}")
    if count == 0:
        return CudaStatus(0, "CUDA reports no visible GPU (check CUDA_VISIBLE_DEVICES)")
    return CudaStatus(count)


def parse_device(device: str) -> int:
    """``"cuda:N"`` -> N."""
    if not isinstance(device, str) or not device.startswith("cuda:") or not device[5:].isdigit():
        raise InvalidArgument(f"cupy devices are named 'cuda:N', got {device!r}")
    return int(device[5:])


def bfloat16_support() -> tuple[Any, str]:
    """(numpy-compatible bfloat16 dtype, "") when CuPy can hold bfloat16 arrays, else (None, reason)."""
    try:
        cupy = import_cupy()
    except ImportError as exc:
        return None, str(exc)
    major = int(cupy.__version__.split(".")[0])
    if major < 14:
        return None, f"cupy {cupy.__version__} has no bfloat16 arrays (CuPy >= 14 with ml_dtypes has)"
    try:
        import ml_dtypes
    except ImportError:
        return None, f"cupy {cupy.__version__} stores bfloat16 only with the ml_dtypes package, which is not installed"
    return np.dtype(ml_dtypes.bfloat16), ""


class CudaRuntime:
    """One CUDA device as the storage and attention use it.

    ``xp`` is the array module (cupy); ``launch`` runs a kernel of
    ``kernels.cu``; the host tier copies through pinned memory on a dedicated
    non-blocking stream, ordered against the current stream with events.
    """

    _lock = threading.Lock()
    _instances: dict[int, CudaRuntime] = {}
    kernels = KernelCache()

    def __init__(self, device_id: int) -> None:
        cupy = import_cupy()
        self.cp = cupy
        self.xp = cupy
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        self.num_sms = int(props["multiProcessorCount"])
        self.device_name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        self.bfloat16, self.bfloat16_reason = bfloat16_support()
        self._copy_stream = None

    @classmethod
    def for_device(cls, device: str) -> CudaRuntime:
        """The shared runtime of ``device`` (``"cuda:N"``)."""
        device_id = parse_device(device)
        with cls._lock:
            if device_id not in cls._instances:
                cls._instances[device_id] = cls(device_id)
            return cls._instances[device_id]

    # -- arrays --------------------------------------------------------------

    def activate(self) -> Any:
        """Context manager making this device current."""
        return self.cp.cuda.Device(self.device_id)

    def native_dtype(self, name: str) -> Any:
        """The dtype user-facing arrays of ``name`` have (bfloat16 needs CuPy support)."""
        if name == "bfloat16":
            if self.bfloat16 is None:
                raise UnsupportedOperation(f"bfloat16 on cupy: {self.bfloat16_reason}")
            return self.bfloat16
        return np.dtype(RAW_DTYPES[name])

    def dtype_name(self, dtype: Any) -> str:
        """Name of a user-facing dtype: float16, bfloat16, float32, float64 or int8."""
        if self.bfloat16 is not None and np.dtype(dtype) == self.bfloat16:
            return "bfloat16"
        name = np.dtype(dtype).name
        if name not in ("float16", "float32", "float64", "int8"):
            raise DTypeMismatch(f"unsupported array dtype {name}")
        return name

    def native(self, x: Any, name: str) -> Any:
        """``x`` as a CuPy array on this device (zero-copy through DLPack), else DeviceMismatch."""
        cp = self.cp
        if isinstance(x, cp.ndarray):
            if x.device.id != self.device_id:
                raise DeviceMismatch(f"{name} is on cuda:{x.device.id}, the storage on {self.device}")
            return x
        dlpack_device = getattr(x, "__dlpack_device__", None)
        if dlpack_device is None:
            raise DeviceMismatch(f"{name} is a host {type(x).__name__}; pass a CuPy array on {self.device}")
        kind, index = dlpack_device()
        if int(kind) != KDL_CUDA or int(index) != self.device_id:
            raise DeviceMismatch(f"{name} lives on DLPack device {(int(kind), int(index))}, the storage on {self.device}")
        try:
            return cp.from_dlpack(x)
        except (TypeError, ValueError, BufferError, RuntimeError) as exc:
            raise DTypeMismatch(f"{name} cannot be imported through DLPack: {exc}") from exc

    def free_memory(self) -> int:
        """Bytes a new pool can take on this device: the driver's free memory plus CuPy's pool held unused."""
        with self.activate():
            free, _total = self.cp.cuda.runtime.memGetInfo()
            pool = self.cp.get_default_memory_pool()
            return int(free + pool.total_bytes() - pool.used_bytes())

    def zeros(self, shape: Sequence[int], dtype: Any) -> Any:
        """A zero-filled device array on this device."""
        with self.activate():
            return self.cp.zeros(tuple(shape), dtype)

    def upload(self, host: np.ndarray) -> Any:
        """A device copy of a host array (index arrays, mostly), queued on the current stream."""
        with self.activate():
            return self.cp.asarray(host)

    def download(self, array: Any) -> np.ndarray:
        """A host copy of a device array (waits for it)."""
        with self.activate():
            return self.cp.asnumpy(array)

    def launch(self, key: ModuleKey, name: str, grid: tuple[int, ...], block: tuple[int, ...],
               args: tuple[Any, ...]) -> None:
        """Run kernel ``name`` of module ``key`` (compiled on first use) on the current stream."""
        with self.activate():
            self.kernels.function(key, name, self.device_id)(grid, block, args)

    def synchronize(self) -> None:
        """Wait for all work queued on this device."""
        with self.activate():
            self.cp.cuda.Device(self.device_id).synchronize()

    # -- host tier -----------------------------------------------------------

    def pinned_empty(self, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """A NumPy array in page-locked memory, so copies to and from it can be asynchronous."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            return np.empty(tuple(shape), dtype)
        memory = self.cp.cuda.alloc_pinned_memory(count * dtype.itemsize)
        return np.frombuffer(memory, dtype, count).reshape(tuple(shape))

    @property
    def copy_stream(self) -> Any:
        """The device's non-blocking stream for host <-> device block copies, made on first use."""
        if self._copy_stream is None:
            with self.activate():
                self._copy_stream = self.cp.cuda.Stream(non_blocking=True)
        return self._copy_stream

    def copy_to_host_async(self, pairs: Sequence[tuple[Any, np.ndarray]]) -> Any:
        """Copy device arrays into pinned host arrays on the copy stream; return the completion event.

        The copy stream first waits for the work already queued on the current
        stream, so it reads what that work wrote.
        """
        with self.activate():
            stream = self.copy_stream
            stream.wait_event(self.cp.cuda.get_current_stream().record())
            for src, out in pairs:
                src.get(stream=stream, out=out, blocking=False)
            return stream.record()

    def copy_to_device_async(self, hosts: Sequence[np.ndarray]) -> tuple[list[Any], Any]:
        """Copy pinned host arrays to new device arrays on the copy stream.

        The current stream waits for the copies, so work queued after this
        call sees the data; returns the arrays and the copies' event (the host
        buffers must live until it completes).
        """
        with self.activate():
            stream = self.copy_stream
            current = self.cp.cuda.get_current_stream()
            outs = [self.cp.empty(h.shape, h.dtype) for h in hosts]
            stream.wait_event(current.record())
            for out, host in zip(outs, hosts):
                out.set(host, stream=stream)
            event = stream.record()
            current.wait_event(event)
            return outs, event

    @staticmethod
    def event_done(event: Any) -> bool:
        """Whether an event from the copy methods has completed (never blocks)."""
        return event is None or bool(event.done)
