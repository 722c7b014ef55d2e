"""Entry point of the cupy backend: a cheap description; cupy is imported only by ``load``."""

from __future__ import annotations

from pagedkv_core.contract.backend import BackendSpec
from pagedkv_core.contract.hookspecs import hookimpl


def _load():
    from .backend import CupyBackend

    return CupyBackend()


@hookimpl
def pagedkv_backends() -> list[BackendSpec]:
    return [BackendSpec(
        name="cupy",
        load=_load,
        summary="NVIDIA GPUs through CuPy, with native CUDA paged-attention kernels",
        install_hint="pip install 'pagedkv-cupy[cuda12x]' (or [cuda13x])",
        distribution="pagedkv-cupy",
    )]
