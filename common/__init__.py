"""Code shared by the coordinator and the school daemon; imports neither of them."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
