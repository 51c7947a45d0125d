"""Campaign Reactor: starts approved marketing campaigns on time, exactly once."""

__version__ = "0.1.0"
