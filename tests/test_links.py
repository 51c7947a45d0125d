"""Signed, scoped links and the email they go into: tables of tokens that must and must not
verify, and the headers and footer every campaign email carries."""

from __future__ import annotations

import datetime as dt

import pytest

from reactor.config import Settings
from reactor.domain.consent import (
    LinkKey,
    Links,
    LinkSigner,
    Purpose,
    TokenError,
    candidate_ids,
    parse_old_keys,
    suppression_id,
)
from reactor.domain.messages import email_message, sms_message
from reactor.domain.models import parse_campaign
from reactor.ports import Recipient

T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
SECRET = b"s" * 32
OLD = b"o" * 32


def signer(
    *, ttl_days: float = 30, grace_days: float = 7, retired: dt.datetime | None = None
) -> LinkSigner:
    keys = [LinkKey("k2", SECRET)]
    if retired is not None:
        keys.append(LinkKey("k1", OLD, retired))
    return LinkSigner(keys, ttl_s=ttl_days * 86400, rotation_grace_s=grace_days * 86400)


def token(s: LinkSigner, now: dt.datetime = T0, **scope: str) -> str:
    values = {"campaign": "c1", "customer": "42", "channel": "email", **scope}
    return s.sign(purpose=Purpose.UNSUBSCRIBE, now=now, **values)


def test_a_token_carries_its_scope_and_no_address() -> None:
    s = signer()
    t = token(s)
    scope = s.verify(t, purpose=Purpose.UNSUBSCRIBE, now=T0 + dt.timedelta(days=1))
    assert (scope.campaign, scope.customer, scope.channel) == ("c1", "42", "email")
    assert scope.issued_at == T0
    assert "@" not in t
    assert "example" not in t
    assert t.startswith("v1.k2.")


def _flip(text: str, at: int) -> str:
    ch = "A" if text[at] != "A" else "B"
    return text[:at] + ch + text[at + 1 :]


@pytest.mark.parametrize(
    ("mangle", "why"),
    [
        (lambda t: _flip(t, len("v1.k2.") + 3), "bad_signature"),  # payload altered
        (lambda t: _flip(t, len(t) - 5), "bad_signature"),  # signature altered
        (lambda t: t.replace("v1.k2.", "v1.k9."), "unknown_key"),
        (lambda t: t.replace("v1.", "v2."), "malformed"),
        (lambda t: t + ".x", "malformed"),
        (lambda t: t.rsplit(".", 1)[0] + ".!!!", "malformed"),
        (lambda t: "x" * 2000, "malformed"),
        (lambda t: "", "malformed"),
    ],
)
def test_an_altered_or_forged_token_is_refused(mangle: object, why: str) -> None:
    s = signer()
    with pytest.raises(TokenError) as err:
        s.verify(mangle(token(s)), purpose=Purpose.UNSUBSCRIBE, now=T0)  # type: ignore[operator]
    assert err.value.why == why


def test_a_token_signed_with_another_secret_is_forged() -> None:
    other = LinkSigner([LinkKey("k2", b"x" * 32)], ttl_s=86400, rotation_grace_s=0)
    with pytest.raises(TokenError) as err:
        signer().verify(token(other), purpose=Purpose.UNSUBSCRIBE, now=T0)
    assert err.value.why == "bad_signature"


def test_tokens_expire_after_their_ttl_and_cannot_come_from_the_future() -> None:
    s = signer(ttl_days=30)
    t = token(s)
    s.verify(t, purpose=Purpose.UNSUBSCRIBE, now=T0 + dt.timedelta(days=29))
    for now in (T0 + dt.timedelta(days=31), T0 - dt.timedelta(hours=1)):
        with pytest.raises(TokenError) as err:
            s.verify(t, purpose=Purpose.UNSUBSCRIBE, now=now)
        assert err.value.why == "expired"


def test_a_retired_key_keeps_its_links_working_for_the_grace_period_only() -> None:
    retired = T0 + dt.timedelta(days=1)
    old_signer = LinkSigner([LinkKey("k1", OLD)], ttl_s=90 * 86400, rotation_grace_s=0)
    old_link = token(old_signer, now=T0)
    rotated = signer(ttl_days=90, grace_days=7, retired=retired)
    # Within the grace period an old link still works...
    scope = rotated.verify(
        old_link, purpose=Purpose.UNSUBSCRIBE, now=retired + dt.timedelta(days=6)
    )
    assert scope.customer == "42"
    # ...and after it, it does not.
    with pytest.raises(TokenError) as err:
        rotated.verify(old_link, purpose=Purpose.UNSUBSCRIBE, now=retired + dt.timedelta(days=8))
    assert err.value.why == "key_retired"
    # A link "signed" by the retired key after its retirement is not believed (a leaked key).
    late = token(old_signer, now=retired + dt.timedelta(days=2))
    with pytest.raises(TokenError):
        rotated.verify(late, purpose=Purpose.UNSUBSCRIBE, now=retired + dt.timedelta(days=3))
    # New links are signed with the current key.
    assert token(rotated).startswith("v1.k2.")


def test_old_keys_parse_and_never_echo_their_secret() -> None:
    keys = parse_old_keys(
        "k1=" + "a" * 32 + "@2026-05-01T00:00:00Z, k0=" + "b" * 32 + "@2026-01-01T00:00:00+00:00"
    )
    assert [k.key_id for k in keys] == ["k1", "k0"]
    assert keys[0].retired_at == dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
    for bad in (
        "k1=" + "c" * 32,
        "k1=" + "c" * 32 + "@yesterday",
        "k1=" + "c" * 32 + "@2026-05-01T00:00:00",
    ):
        with pytest.raises(ValueError, match=r"old key|id=secret") as err:
            parse_old_keys(bad)
        assert "c" * 32 not in str(err.value)


def test_settings_require_a_strong_secret_with_a_public_url() -> None:
    with pytest.raises(ValueError, match="LINK_SECRET"):
        Settings(mongo_uri="mongodb://x", public_base_url="https://m.example.com")
    with pytest.raises(ValueError, match="32 bytes"):
        Settings(
            mongo_uri="mongodb://x", public_base_url="https://m.example.com", link_secret="short"
        )
    with pytest.raises(ValueError, match="http"):
        Settings(
            mongo_uri="mongodb://x", public_base_url="ftp://m.example.com", link_secret="s" * 32
        )
    s = Settings(
        mongo_uri="mongodb://x", public_base_url="https://m.example.com/", link_secret="s" * 32
    )
    links = s.links()
    assert links is not None
    assert links.base_url == "https://m.example.com"


def test_candidate_ids_cover_the_customer_and_the_address_in_both_scopes() -> None:
    ids = candidate_ids("email", "42", "Ana@Example.com")
    assert set(ids) == {
        suppression_id("customer", "42", "email"),
        suppression_id("customer", "42", "all"),
        suppression_id("email", "ana@example.com", "email"),
        suppression_id("email", "ana@example.com", "all"),
    }


def _campaign(**email: str) -> object:
    return parse_campaign(
        {
            "_id": "c1",
            "name": "Spring",
            "status": "approved",
            "startDate": T0,
            "endDate": T0 + dt.timedelta(hours=1),
            "email": {"subject": "Hi {{name}}", **email},
            "sms": {"body": "Sale! Opt out: {{unsubscribe_url}}"},
            "targetedCustomerIds": ["42"],
        }
    )


LINKS = Links(
    "https://m.example.com",
    signer(),
    mailto="unsub@example.com",
    postal_address="1 Main St, Springfield",
)
ANA = Recipient("42", "Ana <script>", "ana@example.com", "+14155550100")


def test_every_email_carries_one_click_headers_and_a_footer() -> None:
    msg = email_message(
        _campaign(text="Hello {{name}}", html="<html><body><p>Hi</p></body></html>"),  # type: ignore[arg-type]
        ANA,
        "ana@example.com",
        message_domain="example.com",
        links=LINKS,
        now=T0,
    )
    headers = dict(msg.headers)
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    https, mailto = headers["List-Unsubscribe"].split(", ")
    assert https.startswith("<https://m.example.com/u/v1.k2.")
    assert https.endswith(">")
    assert mailto.startswith("<mailto:unsub@example.com?subject=unsubscribe%20v1.")
    url = https.strip("<>")
    assert msg.text is not None
    assert f"Unsubscribe: {url}" in msg.text
    assert "1 Main St" in msg.text
    assert msg.html is not None
    assert msg.html.index(f'<a href="{url}">Unsubscribe</a>') < msg.html.index("</body>")
    assert "ana@example.com" not in url
    assert "42" not in url.split("/u/")[0]


def test_a_body_with_its_own_link_gets_no_footer_and_names_are_escaped() -> None:
    msg = email_message(
        _campaign(html="<p>{{name}}</p><a href='{{unsubscribe_url}}'>stop</a>"),  # type: ignore[arg-type]
        ANA,
        "ana@example.com",
        message_domain="example.com",
        links=LINKS,
        now=T0,
    )
    assert msg.html is not None
    assert msg.html.count("/u/v1.") == 1
    assert "&lt;script&gt;" in msg.html
    assert "<script>" not in msg.html


def test_without_links_nothing_is_added() -> None:
    msg = email_message(_campaign(text="Hello"), ANA, "ana@example.com", message_domain="x.com")  # type: ignore[arg-type]
    assert msg.headers == ()
    assert msg.text == "Hello"


def test_an_sms_can_carry_its_own_link() -> None:
    sms = sms_message(_campaign(text="x"), ANA, "+14155550100", links=LINKS, now=T0)  # type: ignore[arg-type]
    url = sms.body.split("Opt out: ")[1]
    scope = LINKS.signer.verify(url.rsplit("/", 1)[1], purpose=Purpose.UNSUBSCRIBE, now=T0)
    assert scope.channel == "sms"
