"""The pages people see. Everything interpolated is escaped here, whatever its source; the
pages load nothing (no scripts, images or fonts) and post only to themselves."""

from __future__ import annotations

import html

_STYLE = (
    "body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:#f5f5f4;"
    "color:#1c1917;margin:0;padding:48px 16px}"
    "main{max-width:480px;margin:0 auto;background:#fff;border-radius:12px;padding:32px;"
    "box-shadow:0 1px 3px rgba(0,0,0,.1)}"
    "h1{font-size:22px;margin:0 0 12px}p{line-height:1.5}"
    "form{margin:12px 0}button{font-size:16px;padding:10px 18px;border-radius:8px;"
    "border:1px solid #a8a29e;background:#fff;cursor:pointer;width:100%}"
    "button.primary{background:#1c1917;color:#fff;border-color:#1c1917}"
    ".muted{color:#78716c;font-size:14px}"
)

_CHANNEL_WORDS = {"email": "emails", "sms": "text messages"}


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        '<meta name=robots content="noindex">'
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )


def _button(action: str, label: str, *, primary: bool = False, test_id: str) -> str:
    cls = ' class="primary"' if primary else ""
    return (
        f'<form method="post"><input type="hidden" name="action" value="{html.escape(action)}">'
        f'<button type="submit"{cls} data-testid="{html.escape(test_id)}">'
        f"{html.escape(label)}</button></form>"
    )


def _from(campaign_name: str | None) -> str:
    return f" from “{html.escape(campaign_name)}”" if campaign_name else ""


def landing(campaign_name: str | None, channel: str) -> str:
    words = _CHANNEL_WORDS.get(channel, "messages")
    return _page(
        "Unsubscribe",
        f"<h1>Unsubscribe</h1><p>You received this{_from(campaign_name)} as one of our "
        f"marketing {html.escape(words)}. Choose what you no longer want to receive.</p>"
        + _button("unsubscribe", f"Unsubscribe from {words}", primary=True, test_id="unsub")
        + _button("unsubscribe_all", "Unsubscribe from everything", test_id="unsub-all")
        + '<p class="muted">Nothing changes until you press a button.</p>',
    )


def done(channel: str, everything: bool) -> str:
    what = "all our marketing messages" if everything else f"our {_CHANNEL_WORDS[channel]}"
    return _page(
        "Unsubscribed",
        f'<h1 data-testid="state">You are unsubscribed</h1><p>You will not receive '
        f"{html.escape(what)} any more. This takes effect at once.</p>"
        + _button("undo", "Undo: keep me subscribed", test_id="undo")
        + '<p class="muted">Unsubscribed by mistake? Undo it here.</p>',
    )


def undone() -> str:
    return _page(
        "Subscribed again",
        '<h1 data-testid="state">You are subscribed again</h1>'
        "<p>Your unsubscribe was undone. You can unsubscribe again from any of our messages.</p>"
        + _button("unsubscribe", "Unsubscribe after all", test_id="unsub"),
    )


def still_unsubscribed(channel: str) -> str:
    """After an undo that leaves the recipient suppressed (an earlier or stronger request, or
    their provider's): it says so, and not why."""
    words = _CHANNEL_WORDS.get(channel, "messages")
    return _page(
        "Still unsubscribed",
        '<h1 data-testid="state">You are still unsubscribed</h1>'
        f"<p>We will not send you {html.escape(words)}: an earlier request to stop, or your "
        "provider's, still stands, and a link cannot undo it. To receive them again, contact "
        "us.</p>",
    )


def invalid() -> str:
    """The same page for any link that does not check out: it says nothing about why."""
    return _page(
        "Link not valid",
        '<h1 data-testid="state">This link is not valid</h1><p>It may have expired or been '
        "copied incompletely. Nothing was changed. Use the unsubscribe link in a recent "
        "message, or reply to it.</p>",
    )
