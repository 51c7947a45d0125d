"""The recipient-facing HTTP listener (PUBLIC_HOST/PUBLIC_PORT, apart from the operator port):
one-click unsubscribe (RFC 8058) and its landing page, and later the providers' webhooks."""

from .server import PublicServer

__all__ = ["PublicServer"]
