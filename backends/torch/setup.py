"""Build of pagedkv-torch's optional native CPU decode kernel (metadata lives in pyproject.toml).

The extension is plain C (no torch headers, so it builds without torch
installed) and optional: where no C compiler with GCC/Clang vector extensions
is present the build skips it, and the backend uses its torch-op decode.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-fno-strict-aliasing", "-Wno-psabi"]
setup(ext_modules=[Extension("pagedkv_torch._cpu_decode", ["csrc/cpu_decode.c"], depends=["csrc/cpu_decode_kernel.h", "csrc/cpu_decode_vec.h"],
                             extra_compile_args=flags, optional=True)])
