"""Apple MLX backend of pagedkv.

Importing this package does not import MLX; the registry builds the backend
(and imports ``mlx.core``) through :mod:`pagedkv_mlx.plugin` on first use.
:mod:`pagedkv_mlx.mlx_lm_cache` serves mlx-lm models a paged prompt cache
(mlx-lm is imported only when a model asks that cache for a mask).
"""

__all__: list[str] = []
