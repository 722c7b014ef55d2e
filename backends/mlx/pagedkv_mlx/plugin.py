"""Entry point of the MLX backend: a cheap description, built on first use.

Nothing here imports MLX, so a machine without it still lists the backend;
``spec.load()`` raises ``ImportError`` there and the registry reports the
backend as unavailable with the install hint.
"""

from __future__ import annotations

from pagedkv_core.contract.backend import BackendSpec
from pagedkv_core.contract.hookspecs import hookimpl

__all__ = ["pagedkv_backends"]


def _load():
    from .backend import MlxBackend

    return MlxBackend()


@hookimpl
def pagedkv_backends() -> list[BackendSpec]:
    return [BackendSpec(
        name="mlx",
        load=_load,
        summary="Apple MLX arrays: the Metal GPU on Apple silicon, the CPU elsewhere",
        install_hint='pip install pagedkv-mlx (MLX itself: pip install mlx; on Linux pip install "mlx[cpu]")',
        distribution="pagedkv-mlx",
    )]
