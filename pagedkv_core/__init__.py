"""pagedkv: a paged KV-cache layer with pluggable device backends.

The core decides *which* blocks hold what; a backend (NumPy, PyTorch, CuPy,
MLX, or your own) moves the bytes and runs paged attention.
"""

from .blocks.cascade import CascadeLayout, build_cascade
from .blocks.metadata import BatchMetadata, HybridMetadata, LayerStep
from .blocks.pool import BlockPool
from .blocks.tables import BlockTable
from .config import AllocationRequest, CacheConfig, PrefixCacheConfig, PressureThresholds
from .contract.attention import (
    Attention,
    AttentionBase,
    AttentionParams,
    AttentionPlan,
    BatchIndex,
    check_batch,
    check_query,
)
from .contract.backend import Backend, BackendSpec, Capabilities, Probe
from .contract.cli import CliCommand
from .contract.storage import BlockStorage, HostBlocks, NumpyHostBlocks, StorageChecks
from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .events import AllCleared, BlockRemoved, BlockStored
from .interfaces import (
    AdvancedKvCacheManager,
    BlockAllocator,
    KvCacheHandle,
    KvCacheManager,
    MultiDeviceCacheManager,
)
from .layers import CacheGroup, GroupLayout, LayerGroup
from .manager.facade import PagedKvCacheManager
from .manager.handle import PagedKvCacheHandle
from .manager.hybrid import Admitted, HybridCacheManager, HybridStats
from .manager.hybrid_prefix import GroupHit, PrefixExplanation
from .manager.multi_device import MultiDeviceManager
from .manager.records import SeqState
from .plugins import BackendRegistry, available_backends, default_registry, get_backend, register_backend
from .policy.eviction import (
    EvictionCandidate,
    EvictionPolicy,
    LfuPolicy,
    LongestFirstPolicy,
    LruPolicy,
    PriorityPolicy,
    SequenceInfo,
    SlidingWindowPolicy,
    StreamingLLMPolicy,
    make_policy,
)
from .policy.pressure import MemoryPressure
from .stats import (
    CacheGcStats,
    CacheHandleStats,
    CacheManagerStats,
    CompressionStats,
    DefragmentResult,
    EvictionResult,
    FragmentationStats,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # configuration and requests
    "CacheConfig", "PrefixCacheConfig", "PressureThresholds", "AllocationRequest",
    # interfaces
    "BlockAllocator", "KvCacheHandle", "KvCacheManager", "AdvancedKvCacheManager", "MultiDeviceCacheManager",
    "EvictionPolicy", "MemoryPressure",
    # the reference implementation
    "PagedKvCacheManager", "PagedKvCacheHandle", "SeqState", "MultiDeviceManager", "BlockPool", "BlockTable",
    "BatchMetadata", "CascadeLayout", "build_cascade",
    # hybrid models: layer groups
    "LayerGroup", "CacheGroup", "GroupLayout", "HybridCacheManager", "HybridMetadata", "LayerStep", "Admitted", "HybridStats",
    "PrefixExplanation", "GroupHit",
    # policies
    "LruPolicy", "LfuPolicy", "LongestFirstPolicy", "PriorityPolicy", "StreamingLLMPolicy", "SlidingWindowPolicy",
    "EvictionCandidate", "SequenceInfo", "make_policy",
    # stats
    "CacheManagerStats", "CacheHandleStats", "CacheGcStats", "CompressionStats", "FragmentationStats",
    "DefragmentResult", "EvictionResult",
    # the backend contract
    "Backend", "BackendSpec", "Capabilities", "Probe", "BlockStorage", "HostBlocks", "NumpyHostBlocks",
    "StorageChecks", "Attention", "AttentionBase", "AttentionParams", "AttentionPlan", "BatchIndex",
    "check_batch", "check_query",
    # prefix-cache events
    "BlockStored", "BlockRemoved", "AllCleared",
    # plugins
    "BackendRegistry", "available_backends", "default_registry", "get_backend", "register_backend", "CliCommand",
    *_errors_all,
]
