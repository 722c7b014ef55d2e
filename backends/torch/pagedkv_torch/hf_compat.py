"""Which transformers the Hugging Face adapter supports, checked before anything of it is imported.

``pagedkv_torch.hf_cache`` is written against the per-layer ``Cache`` API of
transformers 5 (``Cache(layers=...)``, ``CacheLayerMixin``, ``get_mask_sizes``
and ``get_seq_length`` per layer, the sizes masks are built from). Version 4
had another cache protocol and 6 may change it again, so both are refused
with a message that says what to install, instead of failing somewhere inside
``generate``. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

from pagedkv_core.errors import UnsupportedOperation

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "TESTED_TRANSFORMERS",
    "UnsupportedTransformersVersion",
    "check_transformers_version",
    "load_cache_utils",
]

SUPPORTED_TRANSFORMERS = ">=5.0,<6"  # the range the adapter accepts (major version 5)
TESTED_TRANSFORMERS = "5.25.0"  # the release the test suite runs against
_MAJOR = 5
_INSTALL_HINT = f"pip install 'transformers{SUPPORTED_TRANSFORMERS}'"


class UnsupportedTransformersVersion(UnsupportedOperation, ImportError):
    """transformers is missing, or its version is outside :data:`SUPPORTED_TRANSFORMERS`.

    An ``ImportError`` too, so ``pytest.importorskip`` and ``try: import``
    guards treat it like a missing optional dependency.
    """


def check_transformers_version(version: str) -> None:
    """Raise :class:`UnsupportedTransformersVersion` unless ``version`` (e.g. ``"5.23.0"``) is supported."""
    match = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if match is None:
        raise UnsupportedTransformersVersion(
            f"cannot read the transformers version {version!r}; the pagedkv adapter needs "
            f"transformers{SUPPORTED_TRANSFORMERS} ({_INSTALL_HINT})")
    if int(match.group(1)) != _MAJOR:
        raise UnsupportedTransformersVersion(
            f"transformers {version} is not supported by pagedkv_torch.hf_cache: it implements the "
            f"Cache API of transformers{SUPPORTED_TRANSFORMERS} (tested with {TESTED_TRANSFORMERS}); "
            f"run {_INSTALL_HINT}")


def load_cache_utils() -> ModuleType:
    """``transformers.cache_utils`` after checking that transformers is installed and supported."""
    try:
        transformers = importlib.import_module("transformers")
    except ImportError as exc:
        raise UnsupportedTransformersVersion(
            f"the Hugging Face adapter needs transformers, which is not importable here ({exc}); "
            f"run {_INSTALL_HINT}") from exc
    check_transformers_version(getattr(transformers, "__version__", "unknown"))
    return importlib.import_module("transformers.cache_utils")
