"""The process layer: the daemon, worker processes, handover, the fd store, and what they speak."""
