"""Sending identities: who an email is from, through which relay it leaves, which key signs it
and which budget it spends — and which identity a campaign uses.

Identities come from `SENDERS_FILE`, a TOML file, plus the default identity that today's
`SMTP_*` / `EMAIL_FROM` / `DKIM_*` settings describe:

    [senders.news]
    from = "News <news@news.example.com>"   # the From address; its domain is the identity's
    rate_per_second = 20                     # its own cluster-wide budget (default: EMAIL_RATE)

    [senders.news.relay]
    host = "smtp.news.example.com"
    port = 587
    tls = "starttls"                         # none | starttls | tls
    username = "news"
    password_env = "NEWS_SMTP_PASSWORD"      # or password = "...": the secret stays out of files
    pool_size = 8
    ca_file = "/etc/ssl/private-ca.pem"

    [senders.news.dkim]
    selector = "s2026"
    key_file = "/etc/dkim/news.pem"          # an RSA private key (PEM)

A campaign picks one with `email.sender` (its name), or by the domain of `email.from`; neither
means the default. A name or domain no identity has is refused before arming (`unknown_sender`).
Parsing is pure: the environment is handed in, so the CLI edge stays the only reader of it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parseaddr
from typing import Any

from pydantic import SecretStr

from .errors import InvalidCampaign

DEFAULT = "default"
TLS_MODES = ("none", "starttls", "tls")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


class SendersFileError(ValueError):
    """Raised when SENDERS_FILE (or the default identity's settings) cannot be used; the
    message names the identity and the field, never a secret."""


@dataclass(frozen=True)
class Relay:
    host: str
    port: int = 587
    tls: str = "starttls"
    username: str | None = None
    password: SecretStr | None = None
    pool_size: int = 16
    ca_file: str | None = None
    timeout_s: float = 30.0
    ehlo_name: str | None = None


@dataclass(frozen=True)
class DkimKey:
    selector: str
    key_file: str
    domain: str | None = None  # the d= domain; default the identity's (From) domain


@dataclass(frozen=True)
class Identity:
    name: str
    from_address: str  # as written in From (may carry a display name)
    relay: Relay
    dkim: DkimKey | None = None
    rate_per_s: float | None = None  # None: the email channel's rate

    @property
    def address(self) -> str:
        """The bare address (the envelope's MAIL FROM)."""
        return parseaddr(self.from_address)[1]

    @property
    def domain(self) -> str:
        return domain_of(self.from_address)

    @property
    def dkim_domain(self) -> str | None:
        if self.dkim is None:
            return None
        return (self.dkim.domain or self.domain).lower().rstrip(".")

    @property
    def budget_key(self) -> str:
        # The default identity spends the email channel's budget, as before identities.
        return "channel:email" if self.name == DEFAULT else f"sender:{self.name}"


@dataclass(frozen=True)
class Senders:
    identities: Mapping[str, Identity] = field(default_factory=dict)

    @property
    def default(self) -> Identity | None:
        return self.identities.get(DEFAULT)

    def choose(self, doc: Mapping[str, Any]) -> Identity | None:
        """The identity a campaign document asks for; None when it asks for nothing and there
        is no default (email is then not configured). Raises InvalidCampaign(unknown_sender)."""
        email = doc.get("email")
        email = email if isinstance(email, Mapping) else {}
        name, wanted = email.get("sender"), email.get("from")
        if wanted is not None and (
            not isinstance(wanted, str)
            or "@" not in parseaddr(wanted)[1]
            or any(ord(ch) < 32 or ord(ch) == 127 for ch in wanted)
        ):
            raise InvalidCampaign("bad_content", "email.from must be one address on one line")
        domain = domain_of(wanted) if wanted is not None else None
        if name is not None:
            if not isinstance(name, str) or name not in self.identities:
                known = ", ".join(sorted(self.identities)) or "none"
                raise InvalidCampaign(
                    "unknown_sender",
                    f"email.sender {str(name)[:60]!r} is not a sending identity (known: {known})",
                )
            identity = self.identities[name]
            if domain is not None and domain != identity.domain:
                raise InvalidCampaign(
                    "unknown_sender",
                    f"email.from's domain {domain!r} is not sender {name}'s ({identity.domain})",
                )
            return identity
        if domain is not None:
            found = [i for i in self.identities.values() if i.domain == domain]
            if not found:
                raise InvalidCampaign(
                    "unknown_sender",
                    f"email.from {str(wanted)[:80]!r}: no sending identity has the domain "
                    f"{domain!r}",
                )
            # The default first when it has that domain, then by name: stable across replicas.
            return min(found, key=lambda i: (i.name != DEFAULT, i.name))
        return self.default


def campaign_from(doc: Mapping[str, Any]) -> str | None:
    """The campaign's own From (`email.from`), already checked by `Senders.choose`."""
    email = doc.get("email")
    value = email.get("from") if isinstance(email, Mapping) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def domain_of(address: str) -> str:
    return parseaddr(address)[1].rpartition("@")[2].strip().lower().rstrip(".")


def parse_senders(
    text: str | None, env: Mapping[str, str], default: Identity | None = None
) -> Senders:
    """The identities of a SENDERS_FILE's text (None: no file), with `default` added."""
    identities: dict[str, Identity] = {}
    if default is not None:
        identities[DEFAULT] = default
    if text is None:
        return Senders(identities)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SendersFileError(f"not valid TOML: {exc}") from None
    table = data.get("senders")
    if not isinstance(table, dict) or not table:
        raise SendersFileError("needs at least one [senders.NAME] table")
    for name, raw in table.items():
        if name == DEFAULT:
            raise SendersFileError(
                "the identity 'default' is made from SMTP_* / EMAIL_FROM; name yours otherwise"
            )
        if not set(name) <= _NAME_CHARS or len(name) > 64:
            raise SendersFileError(f"identity name {name[:64]!r}: use a-z, 0-9, '-', '_', '.'")
        if not isinstance(raw, dict):
            raise SendersFileError(f"senders.{name} must be a table")
        identities[name] = _identity(name, raw, env)
    return Senders(identities)


def _identity(name: str, raw: dict[str, Any], env: Mapping[str, str]) -> Identity:
    where = f"senders.{name}"
    _only(raw, {"from", "rate_per_second", "relay", "dkim"}, where)
    sender = raw.get("from")
    if not isinstance(sender, str) or "@" not in parseaddr(sender)[1]:
        raise SendersFileError(f"{where}.from: needs an address, e.g. news@news.example.com")
    _check_header(sender, f"{where}.from")
    rate = raw.get("rate_per_second")
    if rate is not None and (not isinstance(rate, int | float) or isinstance(rate, bool)):
        raise SendersFileError(f"{where}.rate_per_second must be a number")
    if rate is not None and rate <= 0:
        raise SendersFileError(f"{where}.rate_per_second must be positive")
    relay_raw = raw.get("relay")
    if not isinstance(relay_raw, dict):
        raise SendersFileError(f"{where}.relay: a [senders.{name}.relay] table is required")
    dkim_raw = raw.get("dkim")
    if dkim_raw is not None and not isinstance(dkim_raw, dict):
        raise SendersFileError(f"{where}.dkim must be a table")
    return Identity(
        name=name,
        from_address=sender,
        relay=_relay(relay_raw, env, f"{where}.relay"),
        dkim=_dkim(dkim_raw, f"{where}.dkim") if dkim_raw is not None else None,
        rate_per_s=float(rate) if rate is not None else None,
    )


def _relay(raw: dict[str, Any], env: Mapping[str, str], where: str) -> Relay:
    _only(
        raw,
        {"host", "port", "tls", "username", "password", "password_env", "pool_size", "ca_file"}
        | {"timeout_seconds", "ehlo_name"},
        where,
    )
    host = raw.get("host")
    if not isinstance(host, str) or not host.strip():
        raise SendersFileError(f"{where}.host is required")
    port = _int(raw, "port", 587, 1, 65535, where)
    tls = raw.get("tls", "starttls")
    if tls not in TLS_MODES:
        raise SendersFileError(f"{where}.tls must be one of {', '.join(TLS_MODES)}")
    username = raw.get("username")
    if username is not None and (not isinstance(username, str) or not username):
        raise SendersFileError(f"{where}.username must be a non-empty string")
    password = _password(raw, env, where)
    if (username is None) != (password is None):
        raise SendersFileError(
            f"{where}: credentials need both username and password (or password_env)"
        )
    if tls == "none" and username is not None:
        raise SendersFileError(
            f"{where}: tls = 'none' would send the credentials in clear text; use starttls or tls"
        )
    timeout = raw.get("timeout_seconds", 30.0)
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise SendersFileError(f"{where}.timeout_seconds must be a positive number")
    return Relay(
        host=host.strip(),
        port=port,
        tls=tls,
        username=username,
        password=password,
        pool_size=_int(raw, "pool_size", 16, 1, 256, where),
        ca_file=_opt_str(raw, "ca_file", where),
        timeout_s=float(timeout),
        ehlo_name=_opt_str(raw, "ehlo_name", where),
    )


def _password(raw: dict[str, Any], env: Mapping[str, str], where: str) -> SecretStr | None:
    if "password" in raw and "password_env" in raw:
        raise SendersFileError(f"{where}: set password or password_env, not both")
    if "password_env" in raw:
        var = raw["password_env"]
        if not isinstance(var, str) or not var:
            raise SendersFileError(f"{where}.password_env must name an environment variable")
        value = env.get(var)
        if not value:
            raise SendersFileError(f"{where}.password_env: the variable {var} is not set")
        return SecretStr(value)
    value = raw.get("password")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SendersFileError(f"{where}.password must be a non-empty string")
    return SecretStr(value)


def _dkim(raw: dict[str, Any], where: str) -> DkimKey:
    _only(raw, {"selector", "key_file", "domain"}, where)
    selector = raw.get("selector")
    key_file = raw.get("key_file")
    if not isinstance(selector, str) or not valid_selector(selector):
        raise SendersFileError(f"{where}.selector must be a DNS label, e.g. s2026")
    if not isinstance(key_file, str) or not key_file:
        raise SendersFileError(f"{where}.key_file is required")
    domain = _opt_str(raw, "domain", where)
    return DkimKey(selector=selector, key_file=key_file, domain=domain)


def valid_selector(selector: str) -> bool:
    labels = selector.split(".")
    return (
        all(
            0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum()
            for label in labels
        )
        and selector.isascii()
    )


def _only(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SendersFileError(f"{where}: unknown field(s) {', '.join(unknown)}")


def _int(raw: dict[str, Any], key: str, default: int, low: int, high: int, where: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise SendersFileError(f"{where}.{key} must be an integer from {low} to {high}")
    return value


def _opt_str(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value):
        raise SendersFileError(f"{where}.{key} must be a non-empty string")
    return value


def _check_header(value: str, where: str) -> None:
    if any(ch in value for ch in "\r\n"):
        raise SendersFileError(f"{where} contains a line break")
