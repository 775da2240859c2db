"""The user-space block layer: requests and the per-export queue."""

from .queue import RequestQueue
from .request import Request

__all__ = ["Request", "RequestQueue"]
