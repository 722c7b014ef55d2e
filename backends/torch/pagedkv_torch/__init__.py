"""PyTorch backend of pagedkv.

Importing this package is cheap: torch is imported only when the backend is
built (``pagedkv_torch.plugin`` hands the registry a lazy description).
"""

__all__: list[str] = []
