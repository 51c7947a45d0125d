"""Settings: every knob of the reactor, read from the environment once at the CLI edge.

Components never read the environment; they take the small frozen configs that `Settings`
derives for them (`scheduler_config()`, `send_config()`, ...).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo.uri_parser import parse_uri

if TYPE_CHECKING:
    from .domain.senders import Senders
    from .engagement.tracker import TrackingConfig
    from .notify.config import NotifyConfig
    from .public.feedback import FeedbackConfig
    from .public.webhooks import WebhookConfig

from .domain.consent import LinkKey, Links, LinkSigner, parse_old_keys
from .domain.sms import LocalHours, parse_hours


def default_instance_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Settings(BaseSettings):
    """The reactor's configuration; field names are the environment variables, upper-cased."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", env_file=None)

    enable_schedulers: bool = True
    mongo_uri: SecretStr
    campaigns_db: str = "marketing"
    campaigns_collection: str = "campaigns"
    segmentation_mongo_uri: SecretStr | None = None
    segmentation_db: str = "retail_db"
    orders_collection: str = "newdatabase"
    customer_id_field: str = "customer_id"
    customer_email_field: str = "email"
    customer_phone_field: str = "phone"
    customer_name_field: str = "name"
    recipient_batch_size: int = Field(250, ge=1, le=100_000)
    shard_size: int = Field(500, ge=1, le=10_000_000)
    shard_concurrency: int = Field(2, ge=0, le=64)
    default_phone_region: str = "US"

    reconcile_interval_seconds: float = Field(60.0, gt=0)
    misfire_grace_seconds: float = Field(3600.0, ge=0)
    schedule_horizon_seconds: float = Field(86400.0, gt=0)
    lease_seconds: float = Field(30.0, gt=0)
    execution_max_failures: int = Field(5, ge=1, le=1000)
    execution_retry_base_seconds: float = Field(10.0, ge=0)
    clock_check_interval_seconds: float = Field(30.0, gt=0)
    shutdown_grace_seconds: float = Field(25.0, ge=0)
    reactor_instance_id: str = Field(default_factory=default_instance_id, min_length=1)

    smtp_host: str | None = None
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_tls: Literal["none", "starttls", "tls"] = "starttls"
    smtp_pool_size: int = Field(16, ge=1, le=256)
    smtp_timeout_seconds: float = Field(30.0, gt=0)
    smtp_ca_file: str | None = None
    smtp_ehlo_name: str | None = None
    email_from: str | None = None

    # ---- sending identities and their authentication (issue 27; docs/deliverability.md) ----
    senders_file: str | None = None
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    dkim_private_key_file: str | None = None
    # Where DKIM signatures are made: a helper process per signing identity (a core of its own),
    # or a worker thread of this process (docs/deliverability.md#dkim-signing).
    dkim_signing: Literal["process", "thread"] = "process"
    require_authenticated_senders: bool = False
    senders_preflight: bool = False  # check SPF/DKIM/DMARC in DNS when arming (implied by REQUIRE)
    dns_resolver: str | None = None  # host[:port] of the resolver pre-flight checks ask
    dns_timeout_seconds: float = Field(3.0, gt=0)
    customer_timezone_field: str = "timezone"  # the customer's IANA zone, for localTime

    twilio_account_sid: str | None = None
    twilio_auth_token: SecretStr | None = None
    twilio_from_number: str | None = None
    twilio_messaging_service_sid: str | None = None
    twilio_api_base_url: str | None = None
    twilio_timeout_seconds: float = Field(15.0, gt=0)

    rate_limit_scope: Literal["cluster", "instance"] = "cluster"
    email_rate_per_second: float = Field(50.0, gt=0)
    sms_rate_per_second: float = Field(10.0, gt=0)
    send_concurrency: int = Field(32, ge=1, le=1024)
    send_max_attempts: int = Field(5, ge=1, le=50)
    retry_base_seconds: float = Field(0.5, gt=0)
    retry_max_seconds: float = Field(30.0, gt=0)
    tempfail_retry_seconds: str = "60,300,900"
    channel_pause_max_seconds: float = Field(300.0, gt=0)
    sms_resolve_after_seconds: float = Field(30.0, ge=0)
    sms_opt_out_text: str = "Reply STOP to opt out."
    sms_max_segments: int = Field(10, ge=1, le=50)
    sms_send_hours: str = "08:00-21:00"
    sms_fallback_timezone: str = "UTC"

    public_host: str = "0.0.0.0"
    public_port: int = Field(8080, ge=0, le=65535)
    public_base_url: str | None = None
    link_secret: SecretStr | None = None
    link_key_id: str = Field("k1", pattern=r"^[A-Za-z0-9_-]{1,16}$")
    link_old_keys: SecretStr | None = None
    link_ttl_seconds: float = Field(180 * 86400.0, gt=0)
    link_rotation_grace_seconds: float = Field(30 * 86400.0, ge=0)
    unsubscribe_mailto: str | None = None
    postal_address: str | None = None

    ses_sns_topic_arns: str = ""
    ses_sns_cert_host: str | None = None
    ses_sns_ca_file: str | None = None
    sendgrid_webhook_public_key: str | None = None
    postmark_webhook_username: str | None = None
    postmark_webhook_password: SecretStr | None = None
    webhook_token: SecretStr | None = None
    # Consent and the public listener's guards (issue 23).
    ses_sns_cert_subject: str | None = None
    ses_sns_max_age_seconds: float = Field(3600.0, gt=0)
    public_max_connections: int = Field(1000, ge=1, le=1_000_000)
    public_nofile_target: int = Field(65536, ge=0)
    link_undo_window_seconds: float = Field(7 * 86400.0, ge=0)  # 0: as long as the link lives
    soft_bounce_limit: int = Field(3, ge=1, le=100)
    complaint_rate_threshold: float = Field(0.001, gt=0, lt=1)
    complaint_min_emails: int = Field(1000, ge=1)

    # ---- notifications (reactor/notify; docs/notifications.md) ----
    notify_enabled: bool = True
    notify_webhook_url: SecretStr | None = None  # URLs may carry tokens: never shown
    notify_webhook_secret: SecretStr | None = None
    notify_slack_url: SecretStr | None = None  # an incoming-webhook URL is itself a secret
    notify_json_url: SecretStr | None = None
    notify_email_to: str = ""  # comma-separated admin addresses
    notify_events: str = ""  # comma-separated event types the defaults above get; empty: all
    notify_allow_private: bool = False
    notify_allow_loopback: bool = False
    notify_timeout_seconds: float = Field(10.0, gt=0, le=120)
    notify_concurrency: int = Field(8, ge=1, le=256)
    notify_retry_base_seconds: float = Field(2.0, gt=0)
    notify_retry_max_seconds: float = Field(300.0, gt=0)
    notify_retry_for_seconds: float = Field(86400.0, gt=0)
    notify_start_late_seconds: float = Field(30.0, gt=0)
    notify_scan_seconds: float = Field(10.0, gt=0)
    notify_failure_spike_share: float = Field(0.2, gt=0, lt=1)
    notify_failure_spike_min_sends: int = Field(20, ge=1)
    notify_progress_percent: int = Field(0, ge=0, le=50)  # campaign.progress every N %; 0: off
    notify_smtp_host: str | None = None
    notify_smtp_port: int = Field(587, ge=1, le=65535)
    notify_smtp_username: str | None = None
    notify_smtp_password: SecretStr | None = None
    notify_smtp_tls: Literal["none", "starttls", "tls"] = "starttls"
    notify_email_from: str | None = None
    # ---- engagement (issue 24): tracked links and opens ----
    tracking: Literal["off", "clicks", "opens_and_clicks"] = "off"
    tracking_do_not_track_field: str = "doNotTrack"  # on the customer's order rows
    tracking_honeypot: bool = True
    trusted_proxies: str = ""  # addresses / CIDR ranges whose X-Forwarded-For is believed
    engagement_retention_days: float = Field(180.0, gt=0)
    engagement_ip_v4_prefix: int = Field(24, ge=0, le=32)
    engagement_ip_v6_prefix: int = Field(48, ge=0, le=128)
    engagement_settle_seconds: float = Field(0.5, gt=0, le=0.9)
    # ---- provider opens and clicks (issue 24: SendGrid / SES events, engagement/provider.py) ----
    provider_engagement: bool = False

    metrics_host: str = "0.0.0.0"
    metrics_port: int = Field(9464, ge=0, le=65535)
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @field_validator("mongo_uri", "segmentation_mongo_uri")
    @classmethod
    def _valid_uri(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        try:
            parse_uri(value.get_secret_value())
        except Exception as exc:  # pymongo raises InvalidURI / ConfigurationError / ValueError
            # Never echo the URI: it may carry credentials.
            raise ValueError(f"not a valid MongoDB URI ({type(exc).__name__})") from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @property
    def tempfail_schedule(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.tempfail_retry_seconds.split(",") if v.strip())

    @field_validator("tempfail_retry_seconds")
    @classmethod
    def _valid_schedule(cls, value: str) -> str:
        try:
            delays = [float(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ValueError("must be comma-separated seconds, e.g. 60,300,900") from None
        if any(d <= 0 for d in delays):
            raise ValueError("every delay must be positive")
        return value

    @model_validator(mode="after")
    def _check_smtp_tls(self) -> Settings:
        if self.smtp_tls == "none" and (self.smtp_username or self.smtp_password):
            raise ValueError(
                "SMTP_TLS=none with SMTP_USERNAME/SMTP_PASSWORD would send the credentials in "
                "clear text; use starttls or tls"
            )
        return self

    @model_validator(mode="after")
    def _check_senders(self) -> Settings:
        from .adapters.dkim import DkimKeyError, load_signer
        from .domain.senders import SendersFileError

        try:
            senders = self.senders()
        except SendersFileError as exc:
            raise ValueError(f"SENDERS_FILE {self.senders_file}: {exc}") from None
        for identity in senders.identities.values():
            if identity.dkim is not None:
                try:
                    load_signer(identity.dkim_domain or identity.domain, identity.dkim)
                except DkimKeyError as exc:
                    raise ValueError(f"sending identity {identity.name!r}: {exc}") from None
        return self

    @field_validator("sms_send_hours")
    @classmethod
    def _valid_hours(cls, value: str) -> str:
        parse_hours(value)
        return value

    @field_validator("sms_fallback_timezone")
    @classmethod
    def _valid_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value[:40]!r} (use an IANA name)") from None
        return value

    @field_validator("public_base_url")
    @classmethod
    def _valid_base_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        url = urlsplit(value.strip())
        if url.scheme not in ("https", "http") or not url.netloc or url.query or url.fragment:
            raise ValueError("must be an http(s) URL without query, e.g. https://mail.example.com")
        return value.strip().rstrip("/")

    @field_validator("link_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value().encode()) < 32:
            raise ValueError("must be at least 32 bytes (e.g. `openssl rand -hex 32`)")
        return value

    @field_validator("webhook_token", "postmark_webhook_password")
    @classmethod
    def _strong_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("sendgrid_webhook_public_key")
    @classmethod
    def _valid_ec_key(cls, value: str | None) -> str | None:
        if value:
            from .public.webhooks import load_ec_key

            load_ec_key(value)
        return value or None

    @model_validator(mode="after")
    def _check_links(self) -> Settings:
        if self.public_base_url and self.link_secret is None:
            raise ValueError("PUBLIC_BASE_URL needs LINK_SECRET to sign recipients' links")
        if self.link_old_keys is not None:
            # Checked here, not in a field validator: pydantic's error for a field repeats its
            # input (the secrets); a model validator's shows the model, whose secrets are masked.
            old = parse_old_keys(self.link_old_keys.get_secret_value())
            if any(k.key_id == self.link_key_id for k in old):
                # It would verify new links with the old secret and refuse every one of them.
                raise ValueError(
                    f"LINK_OLD_KEYS reuses LINK_KEY_ID {self.link_key_id!r}: give the new "
                    "secret a new key id"
                )
        return self

    @model_validator(mode="after")
    def _check_sms(self) -> Settings:
        if self.twilio_from_number and self.twilio_messaging_service_sid:
            raise ValueError("set only one of TWILIO_FROM_NUMBER and TWILIO_MESSAGING_SERVICE_SID")
        return self

    # ---- derived configs -----------------------------------------------------------------

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            instance_id=self.reactor_instance_id,
            reconcile_interval_s=self.reconcile_interval_seconds,
            misfire_grace_s=self.misfire_grace_seconds,
            horizon_s=self.schedule_horizon_seconds,
            lease_s=self.lease_seconds,
            max_failures=self.execution_max_failures,
            retry_base_s=self.execution_retry_base_seconds,
            clock_check_s=self.clock_check_interval_seconds,
        )

    def recipients_config(self) -> RecipientsConfig:
        return RecipientsConfig(
            db=self.segmentation_db,
            collection=self.orders_collection,
            id_field=self.customer_id_field,
            email_field=self.customer_email_field,
            phone_field=self.customer_phone_field,
            name_field=self.customer_name_field,
            batch_size=self.recipient_batch_size,
            timezone_field=self.customer_timezone_field or None,
            do_not_track_field=(
                self.tracking_do_not_track_field or None if self.tracking != "off" else None
            ),
        )

    def send_config(self) -> SendConfig:
        return SendConfig(
            email_rate_per_s=self.email_rate_per_second,
            sms_rate_per_s=self.sms_rate_per_second,
            concurrency=self.send_concurrency,
            max_attempts=self.send_max_attempts,
            retry_base_s=self.retry_base_seconds,
            retry_max_s=self.retry_max_seconds,
            tempfail_retry_s=self.tempfail_schedule,
            channel_pause_max_s=self.channel_pause_max_seconds,
            sms_resolve_after_s=self.sms_resolve_after_seconds,
            sms_opt_out_text=self.sms_opt_out_text,
            sms_max_segments=self.sms_max_segments,
            sms_send_hours=parse_hours(self.sms_send_hours),
            sms_fallback_timezone=self.sms_fallback_timezone,
            default_phone_region=self.default_phone_region,
            batch_size=self.recipient_batch_size,
            shard_size=self.shard_size,
            shard_concurrency=self.shard_concurrency,
            message_domain=(self.email_from or "localhost").rsplit("@", 1)[-1].strip("> ")
            or "localhost",
        )

    def smtp_config(self) -> SmtpConfig | None:
        if not self.smtp_host or not self.email_from:
            return None
        return SmtpConfig(
            host=self.smtp_host,
            port=self.smtp_port,
            username=self.smtp_username,
            password=self.smtp_password,
            tls=self.smtp_tls,
            pool_size=self.smtp_pool_size,
            timeout_s=self.smtp_timeout_seconds,
            sender=self.email_from,
            ca_file=self.smtp_ca_file,
            ehlo_name=self.smtp_ehlo_name,
        )

    def senders(self) -> Senders:
        """The sending identities: SENDERS_FILE's, plus the default one of SMTP_* / EMAIL_FROM /
        DKIM_*. Raises SendersFileError (no secrets in it)."""
        from .domain.senders import DkimKey, Identity, Relay, SendersFileError, parse_senders

        default: Identity | None = None
        if bool(self.dkim_selector) != bool(self.dkim_private_key_file):
            raise SendersFileError("DKIM_SELECTOR and DKIM_PRIVATE_KEY_FILE go together")
        if self.smtp_host and self.email_from:
            key = None
            if self.dkim_selector and self.dkim_private_key_file:
                key = DkimKey(self.dkim_selector, self.dkim_private_key_file, self.dkim_domain)
            default = Identity(
                name="default",
                from_address=self.email_from,
                relay=Relay(
                    host=self.smtp_host,
                    port=self.smtp_port,
                    tls=self.smtp_tls,
                    username=self.smtp_username,
                    password=self.smtp_password,
                    pool_size=self.smtp_pool_size,
                    ca_file=self.smtp_ca_file,
                    timeout_s=self.smtp_timeout_seconds,
                    ehlo_name=self.smtp_ehlo_name,
                ),
                dkim=key,
            )
        text = None
        if self.senders_file:
            try:
                with open(self.senders_file, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise SendersFileError(f"cannot be read ({exc})") from None
        return parse_senders(text, os.environ, default)

    def twilio_config(self) -> TwilioConfig | None:
        if not (self.twilio_account_sid and self.twilio_auth_token):
            return None
        if not (self.twilio_from_number or self.twilio_messaging_service_sid):
            return None
        return TwilioConfig(
            account_sid=self.twilio_account_sid,
            auth_token=self.twilio_auth_token,
            from_number=self.twilio_from_number,
            messaging_service_sid=self.twilio_messaging_service_sid,
            api_base_url=self.twilio_api_base_url,
            timeout_s=self.twilio_timeout_seconds,
        )

    def links(self) -> Links | None:
        """How recipients' links are made, or None when the public listener is not set up."""
        if not self.public_base_url or self.link_secret is None:
            return None
        current = LinkKey(self.link_key_id, self.link_secret.get_secret_value().encode())
        old = parse_old_keys(self.link_old_keys.get_secret_value()) if self.link_old_keys else []
        signer = LinkSigner(
            [current, *old],
            ttl_s=self.link_ttl_seconds,
            rotation_grace_s=self.link_rotation_grace_seconds,
        )
        return Links(
            base_url=self.public_base_url,
            signer=signer,
            mailto=self.unsubscribe_mailto,
            postal_address=self.postal_address,
        )

    def webhook_config(self) -> WebhookConfig | None:
        if not self.public_base_url:
            return None
        from .public.webhooks import WebhookConfig

        twilio = self.twilio_config()
        return WebhookConfig(
            base_url=self.public_base_url,
            ses_topics=frozenset(
                t.strip() for t in self.ses_sns_topic_arns.split(",") if t.strip()
            ),
            ses_cert_host=self.ses_sns_cert_host,
            ses_ca_file=self.ses_sns_ca_file,
            ses_cert_subject=self.ses_sns_cert_subject,
            ses_max_age_s=self.ses_sns_max_age_seconds,
            sendgrid_public_key=self.sendgrid_webhook_public_key,
            postmark_username=self.postmark_webhook_username,
            postmark_password=self.postmark_webhook_password,
            generic_token=self.webhook_token,
            twilio_auth_token=twilio.auth_token if twilio is not None else None,
        )

    def feedback_config(self) -> FeedbackConfig:
        from .public.feedback import FeedbackConfig

        return FeedbackConfig(
            soft_bounce_limit=self.soft_bounce_limit,
            complaint_rate_threshold=self.complaint_rate_threshold,
            complaint_min_emails=self.complaint_min_emails,
        )

    @field_validator("notify_webhook_url", "notify_json_url", "notify_slack_url")
    @classmethod
    def _valid_notify_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value():
            from .notify.destinations import url_problem

            problem = url_problem(value.get_secret_value())
            if problem is not None:
                raise ValueError(problem)
        return value if value is not None and value.get_secret_value() else None

    @field_validator("notify_webhook_secret")
    @classmethod
    def _valid_whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("whsec_"):
            raise ValueError("must be a Standard Webhooks secret (whsec_ followed by base64)")
        return value

    @model_validator(mode="after")
    def _check_notify(self) -> Settings:
        if self.notify_webhook_url and self.notify_webhook_secret is None:
            raise ValueError("NOTIFY_WEBHOOK_URL needs NOTIFY_WEBHOOK_SECRET (whsec_…) to sign")
        return self

    def notify_config(self) -> NotifyConfig:
        from .notify.config import NotifyConfig, NotifySmtp

        events = [e.strip() for e in self.notify_events.split(",") if e.strip()] or None
        defaults: list[dict[str, object]] = []
        if self.notify_webhook_url and self.notify_webhook_secret is not None:
            secret = self.notify_webhook_secret.get_secret_value()
            url = self.notify_webhook_url.get_secret_value()
            defaults.append({"kind": "webhook", "url": url, "secret": secret})
        if self.notify_slack_url is not None:
            defaults.append({"kind": "slack", "url": self.notify_slack_url.get_secret_value()})
        if self.notify_json_url:
            defaults.append({"kind": "json", "url": self.notify_json_url.get_secret_value()})
        admins = [a.strip() for a in self.notify_email_to.split(",") if a.strip()]
        if admins:
            defaults.append({"kind": "email", "to": admins})
        for d in defaults:
            if events is not None:
                d["events"] = events
        smtp = None
        relay = self.smtp_config()
        if self.notify_smtp_host and (self.notify_email_from or self.email_from):
            password = self.notify_smtp_password
            smtp = NotifySmtp(
                host=self.notify_smtp_host,
                port=self.notify_smtp_port,
                sender=str(self.notify_email_from or self.email_from),
                username=self.notify_smtp_username,
                password=password.get_secret_value() if password else None,
                tls=self.notify_smtp_tls,
            )
        elif relay is not None:
            smtp = NotifySmtp(
                host=relay.host,
                port=relay.port,
                sender=self.notify_email_from or relay.sender,
                username=relay.username,
                password=relay.password.get_secret_value() if relay.password else None,
                tls=relay.tls,
                timeout_s=relay.timeout_s,
            )
        return NotifyConfig(
            enabled=self.notify_enabled,
            defaults=tuple(defaults),
            allow_private=self.notify_allow_private,
            allow_loopback=self.notify_allow_loopback,
            timeout_s=self.notify_timeout_seconds,
            concurrency=self.notify_concurrency,
            retry_base_s=self.notify_retry_base_seconds,
            retry_max_s=self.notify_retry_max_seconds,
            retry_for_s=self.notify_retry_for_seconds,
            start_late_s=self.notify_start_late_seconds,
            scan_s=self.notify_scan_seconds,
            failure_spike_share=self.notify_failure_spike_share,
            failure_spike_min=self.notify_failure_spike_min_sends,
            progress_every_percent=self.notify_progress_percent,
            smtp=smtp,
        )

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_proxies(cls, value: str) -> str:
        from .domain.engagement import parse_networks

        parse_networks(value)  # raises ValueError naming the bad entry
        return value

    @model_validator(mode="after")
    def _check_tracking(self) -> Settings:
        if self.tracking != "off" and (not self.public_base_url or self.link_secret is None):
            raise ValueError("TRACKING needs PUBLIC_BASE_URL and LINK_SECRET")
        return self

    def tracking_config(self) -> TrackingConfig:
        from .engagement.tokens import TrackingSigner
        from .engagement.tracker import TrackingConfig

        links = self.links()
        if self.tracking == "off" or links is None or self.link_secret is None:
            return TrackingConfig(mode="off")
        current = LinkKey(self.link_key_id, self.link_secret.get_secret_value().encode())
        old = parse_old_keys(self.link_old_keys.get_secret_value()) if self.link_old_keys else []
        signer = TrackingSigner(
            [current, *old],
            ttl_s=self.link_ttl_seconds,
            rotation_grace_s=self.link_rotation_grace_seconds,
        )
        return TrackingConfig(
            mode=self.tracking,
            base_url=links.base_url,
            signer=signer,
            honeypot=self.tracking_honeypot,
        )

    @property
    def segmentation_uri(self) -> SecretStr:
        return self.segmentation_mongo_uri or self.mongo_uri


@dataclass(frozen=True)
class SchedulerConfig:
    instance_id: str
    reconcile_interval_s: float = 60.0
    misfire_grace_s: float = 3600.0
    horizon_s: float = 86400.0
    lease_s: float = 30.0
    max_sleep_s: float = 2.0
    max_failures: int = 5  # executions failing in a row before the campaign is `failed`
    retry_base_s: float = 10.0  # back-off after the first failed execution; doubles per failure
    clock_check_s: float = 30.0  # how often the offset to the database's clock is measured


@dataclass(frozen=True)
class RecipientsConfig:
    db: str = "retail_db"
    collection: str = "newdatabase"
    id_field: str = "customer_id"
    email_field: str = "email"
    phone_field: str = "phone"
    name_field: str = "name"
    batch_size: int = 1000
    timezone_field: str | None = None  # the customer's IANA zone (localTime)
    do_not_track_field: str | None = None  # read only while tracking is on


DEFAULT_SPLIT_KEY = b"campaign-reactor-splits"


@dataclass(frozen=True)
class SendConfig:
    email_rate_per_s: float = 50.0
    sms_rate_per_s: float = 10.0
    concurrency: int = 16
    max_attempts: int = 5
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    # Delays before re-sending a message a provider refused for now (SMTP 4xx): the default
    # outlasts greylisting (usually 1-5 minutes); after the last one the row is `failed`.
    tempfail_retry_s: tuple[float, ...] = (60.0, 300.0, 900.0)
    # A paused channel probes after 5 s, then twice as long each time, up to this.
    channel_pause_max_s: float = 300.0
    # An uncertain SMS is looked up in Twilio's Messages list this long after its attempt
    # (Twilio's queueing window); found, it is `sent` with its SID, else it stays uncertain.
    sms_resolve_after_s: float = 30.0
    sms_opt_out_text: str = "Reply STOP to opt out."
    sms_max_segments: int = 10
    sms_send_hours: LocalHours = field(default_factory=lambda: parse_hours("08:00-21:00"))
    sms_fallback_timezone: str = "UTC"  # for numbers whose zone phonenumbers does not know
    default_phone_region: str = "US"
    batch_size: int = 1000
    message_domain: str = "localhost"  # the sender's domain, for Message-IDs
    # A started campaign with more targets than this is cut into shards of this many, each
    # sent by whichever replica claims it; None: never sharded (tests on fakes).
    shard_size: int | None = None
    shard_concurrency: int = 2  # shards one replica sends at once
    # HMAC key of A/B assignments: the same on every replica and across deploys, so no
    # customer ever changes variant mid-campaign (a SPLIT_SECRET setting could feed it).
    split_key: bytes = DEFAULT_SPLIT_KEY


@dataclass(frozen=True)
class SmtpConfig:
    host: str
    port: int
    username: str | None
    password: SecretStr | None
    tls: str
    pool_size: int
    timeout_s: float
    sender: str
    ca_file: str | None = None  # a private CA bundle to verify the server's certificate with
    ehlo_name: str | None = None  # the name to greet with (default: this host's FQDN)


@dataclass(frozen=True)
class TwilioConfig:
    account_sid: str
    auth_token: SecretStr
    from_number: str | None
    messaging_service_sid: str | None
    api_base_url: str | None
    timeout_s: float
