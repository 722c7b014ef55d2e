"""CuPy backend of pagedkv: K/V block pools on CUDA devices and native paged-attention kernels.

Importing this package imports neither cupy nor CUDA and compiles nothing:
the backend is built by its plugin's ``BackendSpec.load`` and kernels are
compiled on first use.
"""

__all__: list[str] = []
