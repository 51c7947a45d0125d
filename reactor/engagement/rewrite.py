"""Link rewriting: a campaign's link table, and a rendered message's links made tracked.

The link table is the campaign's own list of destinations, taken from its content as written
(HTML `href`s first, then the text part's and the SMS body's URLs, in order, each once). It is
recorded on the campaign when a run starts, and the redirect reads the destination from it,
never from the request: a tracked link can only lead where the campaign's author pointed it.

A rendered link is rewritten when it is in the table; left as it is:
  - a link whose URL is personalised (`https://shop/{{ id }}`): its destination differs per
    recipient, so no table entry can hold it;
  - unsubscribe links (`PUBLIC_BASE_URL/...`), `mailto:` and `tel:` (not http(s));
  - a link the author marks: `<a data-notrack href=...>` in HTML, `notrack:https://...` in the
    text part or an SMS. The marker is removed from what is sent.

Opens: a 1x1 transparent GIF at the end of the HTML body. Clicks in HTML also get one hidden
link (`display:none`, no text, `aria-hidden`, out of the tab order) that no person can see or
reach; whatever follows it is a scanner.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Iterable

MAX_LINKS = 500  # a table this long is not a newsletter; the rest stay untracked

NOTRACK_ATTR = "data-notrack"
NOTRACK_PREFIX = "notrack:"

_ANCHOR = re.compile(r"<(a|area)\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(r"""(\shref\s*=\s*)("([^"]*)"|'([^']*)'|([^\s"'>]+))""", re.IGNORECASE)
_NOTRACK = re.compile(r"\s" + NOTRACK_ATTR + r"""(\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""", re.I)
_URL = re.compile(r"(notrack:)?(https?://[^\s<>\"'()\[\]{}]+)", re.IGNORECASE)
_TRAILING = ".,;:!?*"
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_TEMPLATED = ("{{", "{%", "}}", "%}")


def _clean(url: str) -> str:
    return url.rstrip(_TRAILING)


def _trackable(url: str) -> bool:
    lowered = url.lower()
    return lowered.startswith(("http://", "https://")) and not any(t in url for t in _TEMPLATED)


def _html_hrefs(body: str) -> Iterable[tuple[str, bool]]:
    """(destination, marked not-to-track) of each anchor in `body`."""
    for tag in _ANCHOR.finditer(body):
        href = _HREF.search(tag.group(0))
        if href is None:
            continue
        value = href.group(3) or href.group(4) or href.group(5) or ""
        yield html.unescape(value).strip(), bool(_NOTRACK.search(tag.group(0)))


def _text_urls(text: str) -> Iterable[tuple[str, bool]]:
    for match in _URL.finditer(text):
        if text.startswith(_TEMPLATED[:2], match.end()):
            continue  # `https://shop/{{ id }}`: personalised, its start is no destination
        yield _clean(match.group(2)), bool(match.group(1))


def link_table(html_part: str | None, text_part: str | None, sms: str | None) -> list[str]:
    """The campaign's destinations, numbered by their position in this list."""
    seen: dict[str, None] = {}
    found = [
        *(_html_hrefs(html_part) if html_part else ()),
        *(_text_urls(text_part) if text_part else ()),
        *(_text_urls(sms) if sms else ()),
    ]
    for url, marked in found:
        if not marked and _trackable(url) and url not in seen and len(seen) < MAX_LINKS:
            seen[url] = None
    return list(seen)


Tracked = Callable[[int], str]  # link number -> the tracked URL for this recipient
# What to do with one anchor tag or text URL, worked out once: the text to put back as it is,
# or the text around the tracked URL and the link number. A batch's messages share their tags
# and URLs (only the token differs per recipient), so a plan is made once per batch, not once
# per message: each message then costs a regex scan and a dictionary lookup per link.
Plan = str | tuple[str, int, str]
Plans = dict[str, Plan]


def _anchor_plan(tag: str, table: dict[str, int], skip_prefix: str) -> Plan:
    if _NOTRACK.search(tag):
        return _NOTRACK.sub("", tag)
    href = _HREF.search(tag)
    if href is None:
        return tag
    raw = href.group(3) or href.group(4) or href.group(5) or ""
    url = (html.unescape(raw) if "&" in raw else raw).strip()
    n = table.get(url)
    if n is None or url.startswith(skip_prefix):
        return tag
    return (tag[: href.start()] + href.group(1) + '"', n, '"' + tag[href.end() :])


def _url_plan(match: re.Match[str], table: dict[str, int], skip_prefix: str) -> Plan:
    raw = match.group(2)
    clean = _clean(raw)
    if match.group(1):  # marked: the marker goes, the link stays as written
        return raw
    n = table.get(clean)
    if n is None or clean.startswith(skip_prefix):
        return match.group(0)
    return ("", n, raw[len(clean) :])


def rewrite_html(
    body: str,
    table: dict[str, int],
    tracked: Tracked,
    skip_prefix: str,
    plans: Plans | None = None,
    *,
    escaped: bool = False,
) -> str:
    """`plans`: shared by the messages of one batch (same table, same prefix). `escaped`: the
    URLs `tracked` gives are already HTML-escaped (else they are escaped here)."""
    known: Plans = {} if plans is None else plans
    escape = _same if escaped else html.escape

    def anchor(tag_match: re.Match[str]) -> str:
        tag = tag_match.group(0)
        plan = known.get(tag)
        if plan is None:
            plan = known[tag] = _anchor_plan(tag, table, skip_prefix)
        if isinstance(plan, str):
            return plan
        return plan[0] + escape(tracked(plan[1])) + plan[2]

    return _ANCHOR.sub(anchor, body)


def _same(text: str) -> str:
    return text


def rewrite_text(
    text: str,
    table: dict[str, int],
    tracked: Tracked,
    skip_prefix: str,
    plans: Plans | None = None,
) -> str:
    """`plans`: as for `rewrite_html` (a separate dictionary: the keys are not tags)."""
    known: Plans = {} if plans is None else plans

    def url(match: re.Match[str]) -> str:
        key = match.group(0)
        plan = known.get(key)
        if plan is None:
            plan = known[key] = _url_plan(match, table, skip_prefix)
        if isinstance(plan, str):
            return plan
        return tracked(plan[1]) + plan[2]

    return _URL.sub(url, text)


def strip_markers(text: str) -> str:
    """Untracked content still loses its markers (a do-not-track recipient, tracking off).
    Content without one comes back as it is, unscanned: this runs for every message sent
    untracked, and scanning a newsletter's two parts for none cost 15 µs a message."""
    if NOTRACK_PREFIX not in text.lower():
        return text
    return _URL.sub(lambda m: m.group(2), text)


def strip_html_markers(body: str) -> str:
    if NOTRACK_ATTR not in body.lower():
        return body
    return _ANCHOR.sub(lambda m: _NOTRACK.sub("", m.group(0)), body)


def append_to_body(body: str, fragment: str) -> str:
    """`fragment` before the last `</body>` (any case, spaces before `>`), else at the end."""
    at = body.rfind("</body>")
    if at < 0 or _BODY_END.search(body, at + 7):
        # Not the usual spelling, or one more after it: the expression finds the last.
        ends = list(_BODY_END.finditer(body))
        if not ends:
            return body + fragment
        at = ends[-1].start()
    return body[:at] + fragment + body[at:]


def pixel(url: str, *, escaped: bool = False) -> str:
    """`escaped`: `url` is already HTML-escaped."""
    return (
        f'<img src="{url if escaped else html.escape(url)}" width="1" height="1" alt="" '
        'style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">'
    )


def honeypot(url: str, *, escaped: bool = False) -> str:
    return (
        f'<a href="{url if escaped else html.escape(url)}" style="display:none" '
        'aria-hidden="true" tabindex="-1"></a>'
    )
