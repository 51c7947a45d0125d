"""Wiring, task groups and shutdown — nothing else.

Shutdown runs in two phases (uvicorn's model): the first request stops intake (change stream,
sweeps, timers), lets in-flight sends finish within the grace period, releases the leases so
another replica continues at once, and persists the resume token; a second request cancels
whatever is left.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from .adapters.clock import DatabaseClock, SystemClock
from .adapters.mongo import (
    MongoAudiences,
    MongoBudgets,
    MongoCampaignStore,
    MongoChangeFeed,
    MongoFeedback,
    MongoLedger,
    MongoRecipientActions,
    MongoRecipients,
    MongoShards,
    MongoSuppressions,
)
from .adapters.mongo.engagement import MongoEngagement
from .adapters.mongo.splits import MongoSplits
from .adapters.senders import campaign_admission, default_signer, identity_senders
from .adapters.smtp import SmtpEmailSender
from .adapters.twilio_sms import TwilioSmsSender
from .config import Settings
from .domain.engagement import parse_networks
from .engagement.provider import MongoListenerOpens, ProviderSignals, SignalsConfig
from .engagement.recorder import IpPolicy, Recorder
from .engagement.tokens import SHORT_CODE_CHARS
from .engagement.tracker import Tracker
from .execution import Executor, StopReason
from .http import OpsServer
from .metrics import Metrics
from .notify.notifier import Notifier
from .ports import Clock, EmailSender, SmsSender
from .public import PublicServer
from .public.tracking import TrackingRoutes
from .scheduling.barriers import Barriers
from .scheduling.reconciler import Reconciler
from .scheduling.scheduler import Scheduler
from .scheduling.watcher import Watcher
from .splits.decide import Decider
from .suppression import SuppressionList

log = logging.getLogger(__name__)

CLOCK_OFFSET_WARN_S = 1.0


def mongo_client(uri: str, instance: str, **kwargs: Any) -> AsyncMongoClient[dict[str, Any]]:
    if "serverselectiontimeoutms" not in uri.lower():
        kwargs.setdefault("serverSelectionTimeoutMS", 10_000)  # keyword options beat the URI's
    return AsyncMongoClient(uri, tz_aware=True, appname=f"campaign-reactor/{instance}", **kwargs)


@dataclass(frozen=True)
class _Parts:
    store: MongoCampaignStore
    ledger: MongoLedger
    feed: MongoChangeFeed
    db_clock: DatabaseClock
    executor: Executor
    scheduler: Scheduler
    reconciler: Reconciler
    watcher: Watcher
    suppression_store: MongoSuppressions
    suppressions: SuppressionList
    actions: MongoRecipientActions
    feedback: MongoFeedback
    shards: MongoShards
    engagement: MongoEngagement | None = None


class Reactor:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        serve_http: bool = True,
    ) -> None:
        self.settings = settings
        # The local clock this instance reads (a skewed one in tests); decisions are the
        # database's regardless (DatabaseClock, $$NOW).
        self.clock = clock or SystemClock()
        self.metrics = Metrics()
        self._serve_http = serve_http
        self.instance_id = settings.reactor_instance_id
        self.ready = anyio.Event()
        self._stop_requests = 0
        self._stop = anyio.Event()
        self._outer: anyio.CancelScope | None = None
        self.scheduler: Scheduler | None = None
        self.executor: Executor | None = None
        self.watcher: Watcher | None = None
        self.reconciler: Reconciler | None = None
        self.http: OpsServer | None = None
        self.public: PublicServer | None = None
        self.suppressions: SuppressionList | None = None
        self.store: MongoCampaignStore | None = None
        self.db_clock: DatabaseClock | None = None
        self.mongodb_reachable = False
        self.notifier: Notifier | None = None
        self.recorder: Recorder | None = None  # tracked hits, written in batches
        # Sending identities (SENDERS_FILE) other than the default: their own SMTP senders.
        self.identity_senders: dict[str, EmailSender] = {}

    def request_shutdown(self) -> None:
        """First call: graceful drain. Second call: cancel everything now."""
        self._stop_requests += 1
        self._stop.set()
        if self._stop_requests >= 2 and self._outer is not None:
            log.warning("second shutdown request: cancelling in-flight work now")
            self._outer.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        with anyio.CancelScope() as outer:
            self._outer = outer
            client = mongo_client(s.mongo_uri.get_secret_value(), self.instance_id)
            seg_client = client
            if s.segmentation_mongo_uri is not None:
                seg_client = mongo_client(s.segmentation_uri.get_secret_value(), self.instance_id)
            email, sms = self._senders()
            self.identity_senders = dict(
                identity_senders(s.senders(), process=s.dkim_signing == "process")
            )
            try:
                await self._serve(client, seg_client, email, sms, task_status)
            finally:
                with anyio.CancelScope(shield=True):
                    for sender in (email, sms, *self.identity_senders.values()):
                        if sender is not None:
                            await sender.aclose()
                    if self.http is not None:
                        await self.http.stop()
                    if self.public is not None:
                        await self.public.stop()
                    if self.recorder is not None:  # the listener is closed: write what it took
                        await self.recorder.drain(s.shutdown_grace_seconds)
                    if self.store is not None:
                        await self.store.aclose()
                    if self.notifier is not None:
                        await self.notifier.aclose()
                    if seg_client is not client:
                        await seg_client.close()
                    await client.close()
        log.info("reactor %s stopped", self.instance_id)

    def _senders(self) -> tuple[EmailSender | None, SmsSender | None]:
        s = self.settings
        email: EmailSender | None = None
        if (smtp := s.smtp_config()) is not None:
            signer = default_signer(s.senders(), process=s.dkim_signing == "process")
            email = SmtpEmailSender(smtp, signer=signer)
        sms: SmsSender | None = None
        if (twilio := s.twilio_config()) is not None:
            sms = TwilioSmsSender(twilio)
        if email is None:
            log.warning(
                "email channel not configured (SMTP_HOST / EMAIL_FROM): email deliveries "
                "will be recorded as skipped (channel_not_configured)"
            )
        if sms is None:
            log.warning(
                "SMS channel not configured (TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN / "
                "TWILIO_FROM_NUMBER): SMS deliveries will be recorded as skipped "
                "(channel_not_configured)"
            )
        return email, sms

    async def _serve(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        seg_client: AsyncMongoClient[dict[str, Any]],
        email: EmailSender | None,
        sms: SmsSender | None,
        task_status: TaskStatus[None],
    ) -> None:
        s = self.settings
        sched_cfg = s.scheduler_config()
        parts = self._build(client, seg_client, email, sms)
        store, ledger, feed, db_clock = parts.store, parts.ledger, parts.feed, parts.db_clock
        executor = parts.executor
        reconciler, watcher = parts.reconciler, parts.watcher

        async def readiness() -> dict[str, bool]:
            # From state the service keeps, never a database round trip per request.
            checks = {"mongodb": self.mongodb_reachable, "suppressions": parts.suppressions.up}
            if s.enable_schedulers:
                checks["change_stream"] = watcher.up
                checks["first_sweep"] = reconciler.first_sweep.is_set()
            return checks

        if self._serve_http:
            self.http = OpsServer(self.metrics, readiness, s.metrics_host, s.metrics_port)
            await self.http.start()
            log.info("metrics and health on http://%s:%s", s.metrics_host, self.http.port)
            await self._serve_public(parts)

        await self._wait_for_mongodb(store, ledger, feed, db_clock)
        await self._ensure_indexes(parts)
        self.metrics.schedulers_enabled.set(1 if s.enable_schedulers else 0)
        async with anyio.create_task_group() as sending:
            sending.start_soon(parts.suppressions.follow)
            await sending.start(executor.serve)
            sending.start_soon(self._watch_clock, feed, db_clock, sched_cfg.clock_check_s)
            if self.notifier is not None:
                sending.start_soon(self._run_notifier, self.notifier)
            async with anyio.create_task_group() as intake:
                await self._start_intake(intake, parts)
                task_status.started()
                await self._stop.wait()
                log.info(
                    "shutdown requested: stopping intake, draining sends for up to %gs",
                    s.shutdown_grace_seconds,
                )
                intake.cancel_scope.cancel()
            await self._drain(parts)
            sending.cancel_scope.cancel()

    async def _ensure_indexes(self, parts: _Parts) -> None:
        s = self.settings
        await parts.suppression_store.ensure_indexes()
        await parts.feedback.ensure_indexes()
        await parts.shards.ensure_indexes()
        if parts.engagement is not None:
            await parts.engagement.ensure_indexes(
                retention_days=s.engagement_retention_days,
                short_link_days=s.link_ttl_seconds / 86400,
            )

    async def _start_intake(self, intake: TaskGroup, parts: _Parts) -> None:
        """The scheduler, the stream and the sweep (unless ENABLE_SCHEDULERS=false)."""
        s = self.settings
        sched_cfg = s.scheduler_config()
        if not s.enable_schedulers:
            log.warning(
                "ENABLE_SCHEDULERS=false: this instance arms and fires nothing; "
                "it serves metrics and health only"
            )
            self.ready.set()
            return
        await intake.start(parts.scheduler.run)
        intake.start_soon(parts.watcher.run)
        intake.start_soon(parts.reconciler.run)
        intake.start_soon(self._announce_ready, parts.watcher)
        log.info(
            "📅 Campaign scheduler started (instance %s, horizon %gs, sweep "
            "every %gs, misfire grace %gs)",
            self.instance_id,
            sched_cfg.horizon_s,
            sched_cfg.reconcile_interval_s,
            sched_cfg.misfire_grace_s,
        )

    async def _drain(self, parts: _Parts) -> None:
        """Shutdown's second half: in-flight sends finish within the grace, the resume token
        and the notifications in hand are saved (each shielded, bounded)."""
        s = self.settings
        await parts.executor.stop_all(StopReason.SHUTDOWN, s.shutdown_grace_seconds)
        with anyio.move_on_after(5, shield=True):
            try:
                await parts.watcher.save_token()
            except Exception as exc:  # MongoDB gone at shutdown is no bug: one line, no traceback
                log.warning(
                    "could not persist the resume token at shutdown (%s: %s)",
                    type(exc).__name__,
                    _first_line(exc),
                )
        if self.notifier is not None:
            await self.notifier.drain(5)

    def _build(
        self,
        client: AsyncMongoClient[dict[str, Any]],
        seg_client: AsyncMongoClient[dict[str, Any]],
        email: EmailSender | None,
        sms: SmsSender | None,
    ) -> _Parts:
        """The components, wired: adapters first, then the feed (handed to both the watcher
        and the reconciler), then the logic on top."""
        s = self.settings
        db = client[s.campaigns_db]
        store = MongoCampaignStore(db, s.campaigns_collection)
        ledger = MongoLedger(db)
        # The change feed is built first and handed to both the watcher and the reconciler.
        feed = MongoChangeFeed(db, s.campaigns_collection, self.instance_id)
        barriers = Barriers(feed)
        self.store = store
        rcfg = s.recipients_config()
        recipients = MongoRecipients(seg_client[rcfg.db][rcfg.collection], rcfg)
        # Every decision is the database's; timers fire from the local clock corrected by the
        # measured offset to it.
        db_clock = DatabaseClock(self.clock)
        self.db_clock = db_clock
        suppression_store, suppressions = self._suppression_list(db, db_clock)
        shards = MongoShards(db)
        tracker, engagement = self._tracking(db)
        audiences = self._audiences(db, seg_client)
        executor = self._executor(
            db,
            store,
            ledger,
            recipients,
            (email, sms),
            db_clock,
            suppressions,
            tracker,
            shards,
            audiences,
        )
        scheduler = self._scheduler(db, store, executor, db_clock, recipients)
        reconciler, watcher = self._watchers(store, feed, barriers, scheduler, db_clock)
        self._wire_notifier(db, db_clock, scheduler, executor, watcher)
        self._expose(executor, scheduler, reconciler, watcher)
        return _Parts(
            store,
            ledger,
            feed,
            db_clock,
            executor,
            scheduler,
            reconciler,
            watcher,
            suppression_store,
            suppressions,
            MongoRecipientActions(db, s.campaigns_collection),
            MongoFeedback(db, s.campaigns_collection, dedupe_s=s.link_ttl_seconds),
            shards,
            engagement,
        )

    def _suppression_list(
        self, db: AsyncDatabase[dict[str, Any]], db_clock: DatabaseClock
    ) -> tuple[MongoSuppressions, SuppressionList]:
        """The suppressions store and the list every send checks (kept on the instance)."""
        suppression_store = MongoSuppressions(db)
        suppressions = SuppressionList(suppression_store, db_clock, self.metrics)
        self.suppressions = suppressions
        return suppression_store, suppressions

    def _audiences(
        self, db: AsyncDatabase[dict[str, Any]], seg_client: AsyncMongoClient[dict[str, Any]]
    ) -> MongoAudiences:
        """The audiences too large for a campaign document (a segment query, a targets
        collection, a follow-up), frozen when the campaign starts and read by its shards."""
        s = self.settings
        rcfg = s.recipients_config()
        return MongoAudiences(
            db,
            seg_client[rcfg.db],
            rcfg.collection,
            s.customer_id_field,
            batch_size=s.recipient_batch_size,
        )

    def _expose(
        self, executor: Executor, scheduler: Scheduler, reconciler: Reconciler, watcher: Watcher
    ) -> None:
        """The parts benches and tests reach on the instance."""
        self.executor, self.scheduler, self.reconciler, self.watcher = (
            executor,
            scheduler,
            reconciler,
            watcher,
        )

    def _executor(
        self,
        db: AsyncDatabase[dict[str, Any]],
        store: MongoCampaignStore,
        ledger: MongoLedger,
        recipients: MongoRecipients,
        channels: tuple[EmailSender | None, SmsSender | None],
        db_clock: DatabaseClock,
        suppressions: SuppressionList,
        tracker: Tracker | None,
        shards: MongoShards,
        audiences: MongoAudiences,
    ) -> Executor:
        s = self.settings
        sched_cfg = s.scheduler_config()
        email, sms = channels
        return Executor(
            store=store,
            ledger=ledger,
            recipients=recipients,
            email=email,
            sms=sms,
            clock=db_clock,
            metrics=self.metrics,
            config=s.send_config(),
            instance_id=self.instance_id,
            lease_s=sched_cfg.lease_s,
            max_failures=sched_cfg.max_failures,
            retry_base_s=sched_cfg.retry_base_s,
            suppressions=suppressions,
            links=s.links(),
            tracker=tracker,
            budgets=MongoBudgets(db) if s.rate_limit_scope == "cluster" else None,
            shards=shards,
            audiences=audiences,
            senders=s.senders(),
            identity_senders=self.identity_senders,
        )

    def _scheduler(
        self,
        db: AsyncDatabase[dict[str, Any]],
        store: MongoCampaignStore,
        executor: Executor,
        db_clock: DatabaseClock,
        recipients: MongoRecipients,
    ) -> Scheduler:
        s = self.settings
        sched_cfg = s.scheduler_config()
        return Scheduler(
            store=store,
            executor=executor,
            clock=db_clock,
            metrics=self.metrics,
            config=sched_cfg,
            decider=Decider(  # A/B splits (issue 25)
                MongoSplits(db, s.campaigns_collection),
                owner=self.instance_id,
                lease_s=sched_cfg.lease_s,
                split_key=s.send_config().split_key,
                metrics=self.metrics,
            ),
            admission=campaign_admission(s, db, db_clock.monotonic, store, recipients),
        )

    def _watchers(
        self,
        store: MongoCampaignStore,
        feed: MongoChangeFeed,
        barriers: Barriers,
        scheduler: Scheduler,
        db_clock: DatabaseClock,
    ) -> tuple[Reconciler, Watcher]:
        """The sweep and the stream, sharing one feed and its barriers."""
        reconciler = Reconciler(
            store=store,
            feed=feed,
            barriers=barriers,
            scheduler=scheduler,
            clock=db_clock,
            metrics=self.metrics,
            interval_s=self.settings.scheduler_config().reconcile_interval_s,
        )
        watcher = Watcher(
            feed=feed,
            barriers=barriers,
            scheduler=scheduler,
            reconciler=reconciler,
            clock=db_clock,
            metrics=self.metrics,
        )
        return reconciler, watcher

    def _tracking(self, db: Any) -> tuple[Tracker, MongoEngagement | None]:
        """The send path's link rewriting and, when tracking is on, its store (issue 24)."""
        s = self.settings
        config = s.tracking_config()
        if config.mode == "off":
            # Provider opens and clicks still need the engagement store (and its TTL index).
            kept = MongoEngagement(db, s.campaigns_collection) if s.provider_engagement else None
            return Tracker(config, None), kept
        engagement = MongoEngagement(db, s.campaigns_collection)
        short = len(config.base_url) + len("/s/") + SHORT_CODE_CHARS
        log.info(
            "tracking %s: links through %s (SMS short links %d characters%s)",
            config.mode,
            config.base_url,
            short,
            "" if short <= 30 else "; over 30: a shorter PUBLIC_BASE_URL keeps texts cheaper",
        )
        # Who is do-not-track comes with each batch's recipients (RecipientsConfig).
        return Tracker(config, engagement), engagement

    def _tracking_routes(self, parts: _Parts) -> TrackingRoutes | None:
        s = self.settings
        config = s.tracking_config()
        if parts.engagement is None or config.signer is None:
            return None
        self.recorder = Recorder(
            parts.engagement,
            self.metrics,
            ip=IpPolicy(s.engagement_ip_v4_prefix, s.engagement_ip_v6_prefix),
            settle_s=s.engagement_settle_seconds,
        )
        return TrackingRoutes(
            signer=config.signer,
            store=parts.engagement,
            recorder=self.recorder,
            clock=parts.db_clock,
            metrics=self.metrics,
            trusted_proxies=parse_networks(s.trusted_proxies),
        )

    def _provider_signals(self, parts: _Parts) -> ProviderSignals:
        """Provider opens and clicks (issue 24) through the listener's recorder, or one of
        their own when tracking is off (drained at shutdown the same way)."""
        s = self.settings
        engagement = parts.engagement
        assert engagement is not None  # made by _tracking when PROVIDER_ENGAGEMENT is on
        if self.recorder is None:
            self.recorder = Recorder(
                engagement,
                self.metrics,
                ip=IpPolicy(s.engagement_ip_v4_prefix, s.engagement_ip_v6_prefix),
                settle_s=s.engagement_settle_seconds,
            )
        config = s.tracking_config()
        prefixes = (f"{config.base_url}/c/", f"{config.base_url}/s/") if config.base_url else ()
        return ProviderSignals(
            parts.feedback,
            MongoListenerOpens(engagement.events),
            self.recorder,
            self.metrics,
            SignalsConfig(prefixes, listener_opens=config.mode == "opens_and_clicks"),
        )

    # ---- notifications (reactor/notify) ----

    def _wire_notifier(
        self,
        db: Any,
        db_clock: DatabaseClock,
        scheduler: Scheduler,
        executor: Executor,
        watcher: Watcher,
    ) -> None:
        s = self.settings
        if not s.notify_enabled:
            return
        notifier = Notifier(
            db,
            campaigns_collection=s.campaigns_collection,
            clock=db_clock,
            metrics=self.metrics,
            config=s.notify_config(),
            instance_id=self.instance_id,
        )
        scheduler.notifier = notifier
        executor.notifier = notifier
        executor.on_channel.append(notifier.channel_changed)
        watcher.on_event.append(notifier.observe_change)
        self.notifier = notifier

    async def _run_notifier(self, notifier: Notifier) -> None:
        """Notifications on tasks of their own: a failure here restarts them, after a pause,
        and never touches sending or scheduling."""
        while True:
            try:
                await notifier.run()
            except Exception:
                log.exception("notifications stopped; restarting in 5s")
            await self.clock.sleep(5)

    async def _serve_public(self, parts: _Parts) -> None:
        s = self.settings
        links = s.links()
        if links is None:
            log.warning(
                "PUBLIC_BASE_URL / LINK_SECRET not set: emails go out without an unsubscribe "
                "link or List-Unsubscribe, which Gmail and Yahoo require of bulk senders"
            )
            return
        self.public = PublicServer(
            links=links,
            suppressions=parts.suppression_store,
            actions=parts.actions,
            clock=parts.db_clock,
            metrics=self.metrics,
            host=s.public_host,
            port=s.public_port,
            webhooks=s.webhook_config(),
            feedback=parts.feedback,
            feedback_config=s.feedback_config(),
            max_connections=s.public_max_connections,
            nofile_target=s.public_nofile_target,
            undo_window_s=s.link_undo_window_seconds,
            tracking=self._tracking_routes(parts),
        )
        if self.public.webhooks is not None and s.provider_engagement:
            self.public.webhooks.signals = self._provider_signals(parts)
        await self.public.start()
        log.info(
            "public listener on http://%s:%s (links point to %s)",
            s.public_host,
            self.public.port,
            links.base_url,
        )

    async def _wait_for_mongodb(
        self,
        store: MongoCampaignStore,
        ledger: MongoLedger,
        feed: MongoChangeFeed,
        db_clock: DatabaseClock,
    ) -> None:
        """Until MongoDB answers (with back-off and one clear line per attempt, no traceback):
        then measure the clock offset and make sure the indexes exist."""
        backoff_s = 1.0
        while True:
            try:
                await self._check_clock(feed, db_clock)
                await store.ensure_indexes()
                await ledger.ensure_indexes()
                return
            except PyMongoError as exc:
                self.mongodb_reachable = False
                log.warning(
                    "MongoDB is not reachable yet (%s: %s); retrying in %gs",
                    type(exc).__name__,
                    _first_line(exc),
                    backoff_s,
                )
                await self.clock.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 30.0)

    async def _check_clock(self, feed: MongoChangeFeed, db_clock: DatabaseClock) -> None:
        offset = await db_clock.measure(feed.server_time)
        self.mongodb_reachable = True
        self.metrics.clock_offset.set(offset)
        if abs(offset) >= CLOCK_OFFSET_WARN_S:
            log.warning(
                "this instance's clock is %+.3fs off the database's; timers use the database's",
                -offset,
                extra={"clock_offset_s": offset},
            )

    async def _watch_clock(
        self, feed: MongoChangeFeed, db_clock: DatabaseClock, interval_s: float
    ) -> None:
        """Measure the offset to the database's clock periodically; this is also what tells
        /readyz whether MongoDB answers."""
        while True:
            await self.clock.sleep(interval_s)
            try:
                await self._check_clock(feed, db_clock)
            except PyMongoError as exc:
                if self.mongodb_reachable:
                    log.warning("MongoDB stopped answering (%s)", type(exc).__name__)
                self.mongodb_reachable = False

    async def _announce_ready(self, watcher: Watcher) -> None:
        await watcher.opened.wait()
        if self.suppressions is not None:
            await self.suppressions.opened.wait()
        self.ready.set()
        log.info("reactor %s ready: first sweep done, change stream open", self.instance_id)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else ""
