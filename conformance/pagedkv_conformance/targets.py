"""What the suite runs against: (backend, device) targets, discovered through the registry."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pagedkv_core.contract.backend import Backend, Capabilities
from pagedkv_core.dtypes import check_dtype
from pagedkv_core.errors import BackendUnavailable, InvalidArgument, UnknownBackend
from pagedkv_core.plugins import BackendRegistry

__all__ = ["Target", "discover_targets", "check_request"]


@dataclass(frozen=True)
class Target:
    """One backend on one device; ``skip_reason`` is set when it cannot run here."""

    backend_name: str
    device: str
    backend: Backend | None = field(default=None, compare=False, repr=False)
    capabilities: Capabilities | None = field(default=None, compare=False, repr=False)
    skip_reason: str = ""

    @property
    def id(self) -> str:
        return f"{self.backend_name}-{self.device}"


def check_request(registry: BackendRegistry, backend: str | None, device: str | None,
                  dtypes: Sequence[str] = ()) -> None:
    """Refuse a request that could only verify nothing: an unknown backend, device or dtype.

    A device the backend does not list and cannot probe as usable is a typo
    (``--device tpu``), not a machine without that device: the latter is one
    the backend lists, and its checks skip with the backend's reason.
    """
    for dtype in dtypes:
        check_dtype(dtype)
    if backend is None:
        if device is not None:
            raise InvalidArgument("--device needs --backend: device names belong to one backend")
        return
    if backend not in registry.specs():
        raise registry.unknown(backend)
    if device is None:
        return
    try:
        impl = registry.get(backend)
    except BackendUnavailable:
        return  # its targets skip with the reason; the run then fails for verifying nothing
    known = impl.devices()
    if device not in known and not impl.probe(device).available:
        listing = ", ".join(known) or "none here"
        raise InvalidArgument(f"backend {backend!r} has no device {device!r} (its devices: {listing})")


def discover_targets(registry: BackendRegistry, backend: str | None = None, device: str | None = None) -> list[Target]:
    """Every (backend, device) pair asked for; unusable ones come back with their skip reason.

    With no backend named, every registered backend on every device it
    lists. A backend that lists no device at all yields one skipped target
    named ``<backend>-none`` carrying the backend's reason.
    """
    names = [backend] if backend else registry.names()
    targets: list[Target] = []
    for name in names:
        try:
            impl = registry.get(name)
        except UnknownBackend:
            raise
        except BackendUnavailable as exc:
            targets.append(Target(name, device or "none", skip_reason=exc.reason))
            continue
        devices = [device] if device else impl.devices()
        if not devices:
            targets.append(Target(name, "none", impl, skip_reason=impl.probe().reason or "no device found"))
            continue
        for dev in devices:
            probe = impl.probe(dev)
            if not probe.available:
                targets.append(Target(name, dev, impl, skip_reason=probe.reason))
                continue
            targets.append(Target(name, dev, impl, impl.capabilities(dev)))
    return targets
