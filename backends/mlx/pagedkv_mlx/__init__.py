"""Apple MLX backend of pagedkv.

Importing this package does not import MLX; the registry builds the backend
(and imports ``mlx.core``) through :mod:`pagedkv_mlx.plugin` on first use.
"""

__all__: list[str] = []
