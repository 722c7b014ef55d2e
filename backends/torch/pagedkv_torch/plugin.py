"""Entry point of the PyTorch backend: a cheap description, built on first use.

Nothing heavy is imported here; ``torch`` (and ``triton`` on CUDA) are
imported by ``spec.load()``, so a missing torch shows up as
``BackendUnavailable`` with the install hint, not as a broken plugin.
"""

from __future__ import annotations

from pagedkv_core.contract.backend import BackendSpec
from pagedkv_core.contract.hookspecs import hookimpl

__all__ = ["pagedkv_backends"]


def _load():
    from .backend import TorchBackend

    return TorchBackend()


@hookimpl
def pagedkv_backends() -> list[BackendSpec]:
    return [BackendSpec(
        name="torch",
        load=_load,
        summary="PyTorch tensors on cpu, cuda:N and mps; Triton paged-attention kernels on CUDA",
        install_hint="pip install pagedkv-torch (needs torch>=2.4; add the [triton] extra for the CUDA kernels)",
        distribution="pagedkv-torch",
    )]
