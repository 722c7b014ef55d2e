"""DLPack exchange: hand pools and gathered K/V to NumPy, CuPy or MLX, and take arrays back.

Zero-copy wherever the two sides can share memory: a CPU tensor becomes a
NumPy array over the same bytes, a CUDA tensor a CuPy array on the same GPU,
and NumPy / CuPy / MLX arrays become tensors without a copy. MLX never
imports foreign CPU memory without copying (it owns its buffers), and NumPy
has no bfloat16 or float8, so those cases copy or raise, as documented per
function. Views keep their strides: ``storage.pools(layer)`` crosses as the
live pool, so a consumer can read K/V in place.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from pagedkv_core.errors import DeviceMismatch, DTypeMismatch, InvalidArgument

from .convert import same_device
from .devices import parse_device
from .storage import TorchStorage

__all__ = ["export_array", "import_array", "export_pools", "export_gathered", "LIBRARIES"]

LIBRARIES = ("numpy", "cupy", "mlx")
_NUMPY_LESS = (torch.bfloat16, torch.float8_e4m3fn)


def export_array(tensor: torch.Tensor, library: str = "numpy") -> Any:
    """``tensor`` as an array of ``library`` (``"numpy"``, ``"cupy"`` or ``"mlx"``).

    * numpy: CPU tensors only, zero-copy (writes through); bfloat16/float8
      raise :class:`DTypeMismatch` (NumPy cannot hold them; use ``to_numpy``).
    * cupy: CUDA tensors only, zero-copy on the same GPU.
    * mlx: a copy (MLX does not import foreign CPU memory in place).
    """
    if library not in LIBRARIES:
        raise InvalidArgument(f"library must be one of {', '.join(LIBRARIES)}, got {library!r}")
    if library == "numpy":
        if tensor.device.type != "cpu":
            raise DeviceMismatch(f"NumPy reads host memory only; the tensor is on {tensor.device}")
        if tensor.dtype in _NUMPY_LESS:
            raise DTypeMismatch(f"NumPy has no {tensor.dtype}; convert with backend.to_numpy (a float32 copy)")
        import numpy as np

        return np.from_dlpack(tensor.detach())
    if library == "cupy":
        if tensor.device.type != "cuda":
            raise DeviceMismatch(f"CuPy reads CUDA memory only; the tensor is on {tensor.device}")
        return importlib.import_module("cupy").from_dlpack(tensor.detach())
    return importlib.import_module("mlx.core").from_dlpack(tensor.detach().cpu())


def import_array(array: Any, device: str | torch.device | None = None) -> torch.Tensor:
    """A tensor over ``array``'s memory (``__dlpack__``: NumPy, CuPy, MLX, JAX...).

    Zero-copy when ``device`` is ``None`` or the array's own device; another
    ``device`` costs one copy.
    """
    if not hasattr(array, "__dlpack__"):
        raise InvalidArgument(f"{type(array).__name__} does not support DLPack")
    tensor = torch.from_dlpack(array)
    if device is None:
        return tensor
    target = parse_device(str(device))
    return tensor if same_device(tensor.device, target) else tensor.to(target)


def export_pools(storage: TorchStorage, layer: int, library: str = "numpy") -> tuple[Any, Any]:
    """The live K and V pools of ``layer`` (``[num_blocks, block_size, kv_heads, head_dim]``) in ``library``.

    Quantized pools cross as their raw values; their scales are ``storage.scales(layer)``.
    """
    k, v = storage.pools(storage.checks.layer(layer))
    return export_array(k, library), export_array(v, library)


def export_gathered(storage: TorchStorage, layer: int, block_table: Any, seq_len: int,
                    library: str = "numpy") -> tuple[Any, Any]:
    """One sequence's first ``seq_len`` tokens, ``[seq_len, kv_heads, head_dim]``, in ``library``.

    The gather is one copy on the device; handing it over adds none where
    the devices allow.
    """
    k, v = storage.gather(layer, block_table, seq_len)
    return export_array(k, library), export_array(v, library)
