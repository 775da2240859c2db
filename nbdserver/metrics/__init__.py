"""Prometheus metrics: the collector over the server's counters, and the /metrics endpoint."""

from .collector import ServerCollector
from .http import MetricsEndpoint

__all__ = ["MetricsEndpoint", "ServerCollector"]
