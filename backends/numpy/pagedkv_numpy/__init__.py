"""NumPy backend of pagedkv."""
