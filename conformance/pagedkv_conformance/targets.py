"""What the suite runs against: (backend, device) targets, discovered through the registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagedkv_core.backend import Backend, Capabilities
from pagedkv_core.errors import BackendUnavailable, UnknownBackend
from pagedkv_core.plugins import BackendRegistry

__all__ = ["Target", "discover_targets"]


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
