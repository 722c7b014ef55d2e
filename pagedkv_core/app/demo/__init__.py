"""``pagedkv demo``: continuous batching of a tiny transformer through the real manager and a real backend.

Modules, one job each: ``model`` (the transformer's host math),
``engine`` (the model on the paged cache), ``workload`` (synthetic traffic),
``scheduler`` (the serving loop), ``reference`` and ``selfcheck`` (the
cache-free float64 oracle), ``progress``, ``report``, ``plot`` and ``run``.
"""

from .report import DemoReport
from .run import run_demo

__all__ = ["run_demo", "DemoReport"]
