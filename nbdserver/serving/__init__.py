"""The serving layer: connections around the protocol core, listeners, exports, the server."""
