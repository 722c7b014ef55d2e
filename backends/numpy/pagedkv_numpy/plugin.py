"""Entry point of the NumPy backend: a cheap description, built on first use."""

from __future__ import annotations

from pagedkv_core.contract.backend import BackendSpec
from pagedkv_core.contract.hookspecs import hookimpl


def _load():
    from .backend import NumpyBackend

    return NumpyBackend()


@hookimpl
def pagedkv_backends() -> list[BackendSpec]:
    return [BackendSpec(
        name="numpy",
        load=_load,
        summary="host CPU, NumPy arrays; the embedded default",
        install_hint="pip install pagedkv-numpy",
        distribution="pagedkv-numpy",
    )]
