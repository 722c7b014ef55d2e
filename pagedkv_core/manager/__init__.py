"""The reference cache manager: a façade over components that each own their state.

``PagedKvCacheManager`` (``facade``) takes the lock and delegates;
``records`` holds a sequence's bookkeeping and the handle users hold; the
rest are its parts, one job each: admission, growth, the host tier,
eviction, whole-pool maintenance, persistence, and several devices.
"""

from .facade import PagedKvCacheManager
from .handle import PagedKvCacheHandle
from .multi_device import MultiDeviceManager
from .records import SeqState

__all__ = ["PagedKvCacheManager", "PagedKvCacheHandle", "SeqState", "MultiDeviceManager"]
