"""The loop-like backing layer: backing files and devices, and the engines doing I/O on them."""

from .choice import ENGINES, open_engine
from .engine import DEFAULT_WORKERS, Engine, Store, ThreadPoolEngine
from .file import Backing, Extent, Segment

__all__ = [
    "DEFAULT_WORKERS",
    "ENGINES",
    "Backing",
    "Engine",
    "Extent",
    "Segment",
    "Store",
    "ThreadPoolEngine",
    "open_engine",
]
