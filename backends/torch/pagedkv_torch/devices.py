"""Which devices the torch backend knows here, whether each is usable, and what it can store.

``known_devices`` lists ``cpu`` always, ``cuda:N`` for each visible GPU (or
``cuda:0`` as a known-but-missing device, so ``pagedkv backends`` can say why),
and ``mps`` on macOS. ``probe`` answers with the reason a device is missing.
"""

from __future__ import annotations

import os
import sys

import torch

from pagedkv_core.contract.backend import Probe
from pagedkv_core.errors import InvalidArgument

__all__ = ["parse_device", "known_devices", "probe_device", "fp8_supported", "float_dtypes", "quantized_dtypes",
           "free_device_memory"]


def parse_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> ``torch.device`` (cuda always indexed)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise InvalidArgument(f"not a torch device: {name!r} ({exc})") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise InvalidArgument(f"the torch backend knows cpu, cuda:N and mps, not {name!r}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    return device


def free_device_memory(device: torch.device) -> int | None:
    """Bytes a new pool can take on a CUDA device: the driver's free memory plus what torch's cache holds unused.

    None for host-memory devices (cpu, and mps's unified memory), which the core checks against the host.
    """
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def _cuda_count() -> int:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return 0
    try:
        return torch.cuda.device_count()
    except RuntimeError:
        return 0


def known_devices() -> list[str]:
    count = _cuda_count()
    names = ["cpu"]
    names += [f"cuda:{i}" for i in range(count)] or ["cuda:0"]
    if sys.platform == "darwin":
        names.append("mps")
    return names


def _probe_cuda(index: int) -> Probe:
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return Probe.missing(f"this torch build has no CUDA support (torch {torch.__version__}); "
                             "install a CUDA build of torch")
    count = _cuda_count()
    if count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return Probe.missing(f"no CUDA device is visible{hint}")
    if index >= count:
        return Probe.missing(f"cuda:{index} not present: {count} CUDA device(s) visible")
    return Probe.ok()


def _probe_mps() -> Probe:
    if sys.platform != "darwin":
        return Probe.missing("mps needs macOS on Apple silicon")
    if not torch.backends.mps.is_built():
        return Probe.missing(f"this torch build has no MPS support (torch {torch.__version__})")
    if not torch.backends.mps.is_available():
        return Probe.missing("MPS is not available (needs macOS 12.3+ and a Metal device)")
    return Probe.ok()


def probe_device(name: str | None) -> Probe:
    if name is None:
        return Probe.ok()
    try:
        device = parse_device(name)
    except InvalidArgument as exc:
        return Probe.missing(str(exc))
    if device.type == "cpu":
        return Probe.ok()
    if device.type == "cuda":
        return _probe_cuda(device.index or 0)
    return _probe_mps()


def fp8_supported(device: torch.device) -> bool:
    """float8_e4m3fn pools need a CUDA device of compute capability 8.9 or newer (Ada, Hopper)."""
    if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _mps_bf16() -> bool:
    try:
        torch.zeros(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def float_dtypes(device: torch.device) -> tuple[str, ...]:
    if device.type == "mps":
        return ("float32", "float16", "bfloat16") if _mps_bf16() else ("float32", "float16")
    return ("float32", "float16", "bfloat16")


def quantized_dtypes(device: torch.device) -> tuple[str, ...]:
    return ("int8", "float8_e4m3fn") if fp8_supported(device) else ("int8",)
