"""Notifications: every campaign event, exactly once after deduplication by id, to signed
webhooks, Slack, generic JSON and admin email (see docs/notifications.md).

`Notifier.emit(event_type, campaign_id, key, data)` is the one call other components make to
report a state change of their own (the A/B decision, for one)."""

from .notifier import Notifier

__all__ = ["Notifier"]
