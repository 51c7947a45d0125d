"""Prometheus metrics. One `Metrics` per reactor instance, each with its own registry, so that
several instances can live in one process (tests, `reactor demo`). No campaign or customer ids
appear as labels: cardinality stays bounded whatever the data."""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from . import __version__

_LATENESS_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
_SEND_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self._sending(r)
        self._scheduling(r)
        self._ownership(r)
        self._consent(r)
        self._providers(r)
        self._public(r)
        self._after_the_send(r)
        self._splits_and_engagement(r)
        self.build_info = Info("reactor_build", "Reactor build information.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        # Materialise the label sets dashboards and alerts read, so queries see 0, not no data.
        for channel in ("email", "sms"):
            for outcome in ("sent", "failed", "skipped", "uncertain"):
                self.sends.labels(channel, outcome)
            self.send_retries.labels(channel)
            self.sends_deferred.labels(channel)
            self.channel_paused.labels(channel).set(0)
            for reason in ("unsubscribed", "hard_bounce", "complaint", "sms_stop", "manual"):
                self.suppressed_skips.labels(channel, reason)
            for via in ("one_click", "page"):
                self.unsubscribes.labels(channel, via)
        self.suppression_stream_up.set(0)
        for result in ("sent", "still_uncertain"):
            self.sms_resolved.labels(result)
        for kind in ("start", "end"):
            self.timers_armed.labels(kind).set(0)
        for provider in ("ses", "sendgrid", "postmark", "generic"):
            for kind in ("hard_bounce", "soft_bounce", "complaint", "delivered"):
                self.webhook_events.labels(provider, kind)
            self.webhook_rejected.labels(provider, "signature")
        self.webhook_rejected.labels("twilio", "signature")
        self.send_refusals.labels("email", "hard_bounce")
        self.send_refusals.labels("sms", "sms_stop")
        for status in ("sent", "delivered", "undelivered", "failed"):
            self.sms_status.labels(status)
        for to in ("running", "completed", "missed", "failed", "paused"):
            self.transitions.labels(to)
        self.change_stream_up.set(0)

    def _sending(self, r: CollectorRegistry) -> None:
        """Deliveries, retries, deferrals, channel pauses, send durations."""
        self.sends = Counter(
            "reactor_sends",
            "Deliveries by channel and outcome.",
            ["channel", "outcome"],
            registry=r,
        )
        self.send_retries = Counter(
            "reactor_send_retries",
            "Send attempts retried after a transient error.",
            ["channel"],
            registry=r,
        )
        self.sends_deferred = Counter(
            "reactor_sends_deferred",
            "Sends a provider refused for now (SMTP 4xx), deferred on TEMPFAIL_RETRY_SECONDS.",
            ["channel"],
            registry=r,
        )
        self.sms_resolved = Counter(
            "reactor_sms_uncertain_resolved",
            "Uncertain SMS looked up in Twilio's Messages list: found (sent) or still uncertain.",
            ["result"],
            registry=r,
        )
        self.channel_paused = Gauge(
            "reactor_channel_paused",
            "1 while a channel's breaker holds its sends back (the provider fails for everyone).",
            ["channel"],
            registry=r,
        )
        self.channel_pauses = Counter(
            "reactor_channel_pauses",
            "Times a channel's breaker paused it, by the kind of failure.",
            ["channel", "kind"],
            registry=r,
        )
        self.send_duration = Histogram(
            "reactor_send_duration_seconds",
            "Time one provider call took.",
            ["channel"],
            buckets=_SEND_BUCKETS,
            registry=r,
        )

    def _scheduling(self, r: CollectorRegistry) -> None:
        """Transitions, timers, the change stream, sweeps."""
        self.transitions = Counter(
            "reactor_campaign_transitions",
            "Campaign status changes made by the reactor.",
            ["to"],
            registry=r,
        )
        self.timer_lateness = Histogram(
            "reactor_timer_lateness_seconds",
            "How late a timer fired after its due instant (start lateness includes the claim).",
            ["kind"],
            buckets=_LATENESS_BUCKETS,
            registry=r,
        )
        self.timers_armed = Gauge(
            "reactor_timers_armed", "Timers held in memory.", ["kind"], registry=r
        )
        self.change_stream_up = Gauge(
            "reactor_change_stream_up", "1 while the campaigns change stream is open.", registry=r
        )
        self.change_stream_events = Counter(
            "reactor_change_stream_events", "Change events received.", ["operation"], registry=r
        )
        self.change_stream_restarts = Counter(
            "reactor_change_stream_restarts",
            "Times the change stream was reopened.",
            ["reason"],
            registry=r,
        )
        self.reconcile_runs = Counter(
            "reactor_reconcile_runs", "Reconciliation sweeps completed.", registry=r
        )
        self.reconcile_repairs = Counter(
            "reactor_reconcile_repairs",
            "Corrections a sweep made that the change stream should have made.",
            ["kind"],
            registry=r,
        )

    def _ownership(self, r: CollectorRegistry) -> None:
        """Leases, shards, heartbeats, fences, clocks, campaign errors."""
        self.lease_takeovers = Counter(
            "reactor_lease_takeovers",
            "Running campaigns taken over from an expired lease.",
            registry=r,
        )
        self.shard_events = Counter(
            "reactor_shard_events",
            "Shards of campaigns this instance claimed, took over (an expired lease), finished, "
            "released or failed.",
            ["event"],
            registry=r,
        )
        self.heartbeat_failures = Counter(
            "reactor_lease_heartbeat_failures",
            "Lease renewals that failed (the owner retries; past its margin it fences itself).",
            registry=r,
        )
        self.fenced = Counter(
            "reactor_lease_fenced",
            "Times an owner stopped handing out sends because its lease may have lapsed.",
            registry=r,
        )
        self.clock_offset = Gauge(
            "reactor_clock_offset_seconds",
            "The database's clock minus this instance's, as last measured.",
            registry=r,
        )
        self.campaign_errors = Counter(
            "reactor_campaign_errors",
            "Campaigns rejected or failed, by reason.",
            ["reason"],
            registry=r,
        )
        self.executions_active = Gauge(
            "reactor_executions_active",
            "Campaign executions sending from this instance.",
            registry=r,
        )
        self.campaigns_overdue = Gauge(
            "reactor_campaigns_overdue",
            "Running or paused campaigns past their end date by more than two sweeps (stuck).",
            registry=r,
        )
        self.schedulers_enabled = Gauge(
            "reactor_schedulers_enabled",
            "1 when this instance arms and fires timers.",
            registry=r,
        )

    def _consent(self, r: CollectorRegistry) -> None:
        """Suppressions and unsubscribes."""
        self.suppressed_skips = Counter(
            "reactor_suppressed_skips",
            "Sends skipped because the recipient is on the suppression list, by reason.",
            ["channel", "reason"],
            registry=r,
        )
        self.unsubscribes = Counter(
            "reactor_unsubscribes",
            "Unsubscribes recipients made through their links (one-click POST or the page).",
            ["channel", "via"],
            registry=r,
        )
        self.suppressions_seen = Counter(
            "reactor_suppressions_seen",
            "Suppression entries this instance learned of through the change stream.",
            registry=r,
        )
        self.suppression_stream_up = Gauge(
            "reactor_suppression_stream_up",
            "1 while the suppressions change stream is open.",
            registry=r,
        )
        self.suppression_stream_restarts = Counter(
            "reactor_suppression_stream_restarts",
            "Times the suppressions stream restarted from now (sends were checked again).",
            ["reason"],
            registry=r,
        )

    def _providers(self, r: CollectorRegistry) -> None:
        """Links and the public routes, provider webhooks and receipts."""
        self.link_rejected = Counter(
            "reactor_link_rejected",
            "Recipient links refused: malformed, forged, altered, expired or retired key.",
            ["why"],
            registry=r,
        )
        self.public_requests = Counter(
            "reactor_public_requests",
            "Requests to the public listener, by route and status code.",
            ["route", "status"],
            registry=r,
        )
        self.public_unknown = Counter(
            "reactor_public_unknown",
            "Valid links naming a campaign or a recipient this database does not know.",
            ["what"],
            registry=r,
        )
        self.webhook_events = Counter(
            "reactor_webhook_events",
            "Provider events applied (bounces, complaints, deliveries, STOP/START replies).",
            ["provider", "kind"],
            registry=r,
        )
        self.webhook_replays = Counter(
            "reactor_webhook_replays",
            "Provider events received again and ignored (each applies once).",
            ["provider"],
            registry=r,
        )
        self.webhook_rejected = Counter(
            "reactor_webhook_rejected",
            "Webhook calls refused: a bad or missing signature or credentials, or a bad body.",
            ["provider", "why"],
            registry=r,
        )
        self.sms_status = Counter(
            "reactor_sms_status",
            "SMS delivery receipts from Twilio's status callbacks, by status.",
            ["status"],
            registry=r,
        )
        self.send_refusals = Counter(
            "reactor_send_refusals",
            "Sends a provider refused in a way that suppresses the address: an SMTP 5.1.x "
            "(hard_bounce) or Twilio 21610 (sms_stop).",
            ["channel", "reason"],
            registry=r,
        )

    def _public(self, r: CollectorRegistry) -> None:
        """The public listener under load: connections, refusals, accept errors."""
        # The public listener under load (issue 23).
        self.public_connections = Gauge(
            "reactor_public_connections",
            "Connections open to the public listener now.",
            registry=r,
        )
        self.public_connections_refused = Counter(
            "reactor_public_connections_refused",
            "Connections to the public listener refused (503) because PUBLIC_MAX_CONNECTIONS "
            "were open.",
            registry=r,
        )
        self.accept_errors = Counter(
            "reactor_accept_errors",
            "Connections the process could not accept (out of file descriptors or memory).",
            ["errno"],
            registry=r,
        )

    def _after_the_send(self, r: CollectorRegistry) -> None:
        """Templates and notifications."""
        # Templates (issue 24).
        self.template_errors = Counter(
            "reactor_template_errors",
            "Recipients skipped because their message could not be rendered (template_error), "
            "by channel and part.",
            ["channel", "part"],
            registry=r,
        )
        # ---- notifications (reactor/notify) ----
        self.notifications = Counter(
            "reactor_notifications",
            "Notification delivery attempts by destination kind, event type and outcome "
            "(delivered, retried, refused, gone, dead).",
            ["destination_kind", "event", "outcome"],
            registry=r,
        )
        self.notification_events = Counter(
            "reactor_notification_events",
            "Notification events this instance wrote to the outbox, by type (dropped, error: "
            "events that could not be written).",
            ["event"],
            registry=r,
        )
        self.notification_backlog = Gauge(
            "reactor_notifications_backlog",
            "Notification deliveries not yet delivered, cluster-wide (enabled destinations).",
            registry=r,
        )
        self.notification_oldest_age = Gauge(
            "reactor_notifications_oldest_undelivered_seconds",
            "Age of the oldest notification not yet delivered, cluster-wide (0: none).",
            registry=r,
        )
        self.notification_dead = Gauge(
            "reactor_notifications_dead",
            "Notification deliveries given up after the retry period, cluster-wide (kept 30 days).",
            registry=r,
        )
        for kind in ("webhook", "slack", "json", "email"):
            for outcome in ("delivered", "dead"):
                self.notifications.labels(kind, "campaign.started", outcome)

    def _splits_and_engagement(self, r: CollectorRegistry) -> None:
        """A/B splits and engagement."""
        # A/B splits (issue 25): labelled by the variant's key, never by campaign or customer.
        self.split_sends = Counter(
            "reactor_split_sends",
            "Deliveries of split campaigns by channel, variant key and outcome.",
            ["channel", "variant", "outcome"],
            registry=r,
        )
        self.split_decisions = Counter(
            "reactor_split_decisions",
            "A/B decisions written: a significant winner, or the fallback.",
            ["outcome"],
            registry=r,
        )
        self.split_variant_rate = Gauge(
            "reactor_split_variant_human_rate",
            "Human rate of the tested metric per variant key at the latest decision.",
            ["variant"],
            registry=r,
        )
        # ---- engagement (issue 24: tracked links and opens) ----
        self.engagement_events = Counter(
            "reactor_engagement_events",
            "Tracked opens and clicks recorded, by kind and class (human, machine, scanner, "
            "unknown).",
            ["kind", "class"],
            registry=r,
        )
        self.engagement_rejected = Counter(
            "reactor_engagement_rejected",
            "Tracking requests that recorded nothing: a bad or expired token, an unknown link "
            "or short code, a campaign that is gone, no such delivery, rate-limited.",
            ["why"],
            registry=r,
        )
        self.engagement_dropped = Counter(
            "reactor_engagement_dropped",
            "Accepted hits that were never written (a batch failed, or shutdown outlasted).",
            ["why"],
            registry=r,
        )
        for kind in ("open", "click"):
            for klass in ("human", "machine", "scanner", "unknown"):
                self.engagement_events.labels(kind, klass)
        for why in ("write_failed", "shutdown"):
            self.engagement_dropped.labels(why)
        # ---- provider opens and clicks (issue 24: reactor/engagement/provider.py) ----
        self.provider_engagement = Counter(
            "reactor_provider_engagement",
            "Opens and clicks reported by an email provider's webhook, by what became of them: "
            "recorded, duplicate (the listener saw it), replay, unknown_message (no ledger row "
            "has its Message-ID), failed (not recorded: see the log).",
            ["provider", "kind", "outcome"],
            registry=r,
        )
