"""Which physical blocks hold what: the pool (ref counts, free queue, prefix-hash index), the
hash chains, the per-sequence tables and the step metadata exported to kernels.

Every ref-count and hash change is a method of :class:`~pagedkv_core.blocks.pool.BlockPool`.
"""
