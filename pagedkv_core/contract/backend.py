"""What a backend is: a named device family that builds storage and runs attention.

A plugin hands the registry a :class:`BackendSpec` (cheap: no heavy import);
``spec.load()`` builds the :class:`Backend`, importing torch, cupy or mlx only then.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..config import CacheConfig
from .attention import Attention
from .storage import BlockStorage

__all__ = ["Probe", "Capabilities", "Backend", "BackendSpec"]


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether a backend (or one of its devices) can be used here, and if not, why."""

    available: bool
    reason: str = ""

    @classmethod
    def ok(cls) -> Probe:
        return cls(True, "")

    @classmethod
    def missing(cls, reason: str) -> Probe:
        return cls(False, reason)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do on one device, as data the conformance suite reads.

    ``kernels`` names the attention features: ``decode``, ``prefill``,
    ``sliding_window``, ``soft_cap``, ``gqa``, and where implemented
    ``chunked_local`` (``chunk_size``) and ``sinks`` (``run(..., sinks=)``);
    a plan asked for a feature its backend does not list raises
    ``UnsupportedOperation``. ``cascade`` says ``plan_cascade`` reads a
    group's shared blocks once (without it, ``plan(..., cascade=)`` still
    works, planned as usual). ``block_sizes=None`` means any.
    ``tolerances`` may widen or tighten the suite's per-dtype tolerances per
    operation: ``{("decode", "float16"): (atol, rtol)}``.
    ``expected_failures`` declares checks known to fail: ``{check_id_prefix: reason}``.
    """

    dtypes: tuple[str, ...]
    quantized: tuple[str, ...] = ()
    max_head_dim: int = 256
    block_sizes: tuple[int, ...] | None = None
    kernels: tuple[str, ...] = ("decode", "prefill", "sliding_window", "soft_cap", "gqa")
    tolerances: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    expected_failures: dict[str, str] = field(default_factory=dict)

    def supports_dtype(self, dtype: str) -> bool:
        return dtype in self.dtypes or dtype in self.quantized


@runtime_checkable
class Backend(Protocol):
    """A device family: storage and attention on each of its devices.

    ``devices()`` lists the device names this backend knows of here (``cpu``,
    ``cuda:0``, ``gpu``...), including unusable ones; ``probe(device)`` says
    whether one is usable and why not.
    """

    name: str
    version: str
    attention: Attention

    def devices(self) -> list[str]: ...

    def probe(self, device: str | None = None) -> Probe: ...

    def capabilities(self, device: str) -> Capabilities: ...

    def create_storage(self, config: CacheConfig, device: str) -> BlockStorage: ...

    def asarray(self, array: Any, device: str, dtype: str | None = None) -> Any:
        """Convert a NumPy array to this backend's native array on ``device`` (tests and demos use it)."""

    def to_numpy(self, array: Any) -> Any:
        """Convert a native array back to NumPy (bfloat16 as float32)."""


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A lightweight description of a backend, returned by the plugin hook.

    ``load`` builds the backend and is where heavy imports happen; it may raise
    ``ImportError`` (the registry turns that into "unavailable" with the reason
    and ``install_hint``).
    """

    name: str
    load: Callable[[], Backend]
    summary: str = ""
    install_hint: str = ""
    distribution: str = ""
