"""nbdserver: a Network Block Device server."""

__version__ = "0.1.0"
