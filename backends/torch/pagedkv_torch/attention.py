"""Paged attention of the torch backend: picks a kernel per device and builds a plan.

``kernel="auto"`` runs the Triton kernels on CUDA devices when triton is
importable, the compiled CPU decode kernel (``native_decode``) on CPU pools
when it was built, and torch ops everywhere else; ``kernel="torch"`` forces
torch ops; ``kernel="native"`` forces the compiled CPU decode (prefill, which
is compute-bound and already at SDPA's speed, stays on torch ops);
``kernel="triton"`` forces the Triton kernels, which on CPU tensors run only
under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported) — that is how the GPU code path is tested on machines without one.
"""

from __future__ import annotations

import importlib.util
import os

from pagedkv_core.blocks.cascade import CascadeLayout
from pagedkv_core.contract.attention import AttentionBase, AttentionParams, AttentionPlan, BatchIndex
from pagedkv_core.errors import InvalidArgument, UnsupportedOperation

from .cascade import cascade_plan
from .native_decode import NativeDecodePlan, native_unavailable_reason
from .storage import TorchStorage
from .torch_decode import DEFAULT_TILE_BYTES, TorchDecodePlan
from .torch_prefill import TorchPrefillPlan

__all__ = ["TorchAttention", "KERNELS", "triton_interpreting", "triton_available"]

KERNELS = ("auto", "torch", "native", "triton")


def triton_interpreting() -> bool:
    """Whether Triton kernels will run in the interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


class TorchAttention(AttentionBase):
    """Paged decode and prefill over a :class:`TorchStorage`.

    ``kernel``: ``"auto"``, ``"torch"``, ``"native"`` or ``"triton"`` (see the module doc).
    ``tile_bytes``: float32 K bytes per tile of the torch decode kernel (a
    cache-sized working set; see ``torch_decode``). ``split_tokens``: tokens
    per split of the Triton decode kernel (``None``: enough splits to fill the
    GPU's SMs, at least 256 tokens each).
    """

    storage_type = TorchStorage

    def __init__(self, kernel: str = "auto", *, tile_bytes: int = DEFAULT_TILE_BYTES,
                 split_tokens: int | None = None) -> None:
        if kernel not in KERNELS:
            raise InvalidArgument(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if tile_bytes < 1:
            raise InvalidArgument(f"tile_bytes must be positive, got {tile_bytes}")
        self.kernel = kernel
        self.tile_bytes = int(tile_bytes)
        if split_tokens is not None and split_tokens < 1:
            raise InvalidArgument(f"split_tokens must be positive or None, got {split_tokens}")
        self.split_tokens = split_tokens

    def kernel_for(self, storage: TorchStorage) -> str:
        """The kernel a plan over ``storage`` will use, or the reason the requested one cannot run."""
        dev = storage.torch_device
        if self.kernel == "torch":
            return "torch"
        if self.kernel == "auto":
            if dev.type == "cuda" and triton_available():
                return "triton"
            return "native" if native_unavailable_reason(storage) is None else "torch"
        if self.kernel == "native":
            reason = native_unavailable_reason(storage)
            if reason is not None:
                raise UnsupportedOperation(reason)
            return "native"
        if not triton_available():
            raise UnsupportedOperation("kernel='triton' needs the triton package (pip install pagedkv-torch[triton])")
        if dev.type != "cuda" and not (dev.type == "cpu" and triton_interpreting()):
            raise UnsupportedOperation(
                f"the Triton kernels run on CUDA devices, or on CPU tensors under TRITON_INTERPRET=1; not on {dev}")
        return "triton"

    def plan_index(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams) -> AttentionPlan:
        """Build the step's plan for ``index`` (``plan``, inherited, validates raw arrays once and calls this).

        ``index`` may be hand-made: every plan class bounds-checks it
        (:func:`~pagedkv_core.contract.attention.check_index_bounds`), except the
        compiled CPU decode, which checks each block id and length in C.
        """
        self.check_storage(storage)
        kernel = self.kernel_for(storage)
        decode = bool(getattr(index, "is_decode", False))
        if kernel == "triton":
            from .triton_attention import TritonDecodePlan, TritonPrefillPlan

            if decode:
                return TritonDecodePlan(storage, index, params, self.split_tokens)
            return TritonPrefillPlan(storage, index, params)
        if decode and kernel == "native":
            return NativeDecodePlan(storage, index, params)
        if decode:
            return TorchDecodePlan(storage, index, params, self.tile_bytes)
        return TorchPrefillPlan(storage, index, params)

    def plan_cascade(self, storage: TorchStorage, index: BatchIndex, params: AttentionParams,
                     layout: CascadeLayout) -> AttentionPlan:
        """Plan a decode batch whose groups share leading blocks: each group's shared blocks are read once.

        Torch ops on every device (see ``cascade``); rows in no group, and
        quantized pools, take the plan ``plan_index`` builds.
        """
        return cascade_plan(self, storage, index, params, layout)
