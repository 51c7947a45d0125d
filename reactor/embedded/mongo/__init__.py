"""A MongoDB wire-protocol server on mongomock's engine, for tests and `reactor demo`."""

from .server import MongoEmulator

__all__ = ["MongoEmulator"]
