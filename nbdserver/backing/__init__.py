"""The loop-like backing layer: backing files and devices, and the engines doing I/O on them."""

from .engine import DEFAULT_WORKERS, ENGINES, Engine, ThreadPoolEngine, open_engine
from .file import Backing, Extent, Segment

__all__ = ["DEFAULT_WORKERS", "ENGINES", "Backing", "Engine", "Extent", "Segment", "ThreadPoolEngine", "open_engine"]
