"""Link slots: a tracked campaign's links found once, in its compiled templates, not per message.

Rewriting links after rendering (reactor/engagement/rewrite.py) scans each message's HTML and
text with regular expressions and calls back into Python for every link: ~30 µs of an
8-link newsletter, most of what tracking costs a send. The links an author writes are literal
text in the template, the same for every recipient, so they can be found once, when the
campaign's templates are compiled for tracking: each becomes a slot, a marker that renders
as `opener + number + CLOSER`, and a message's slots are filled with a split and a join.

    HTML   the `href` value of an `<a>` or `<area>` tag written whole in the template's text
    text   a URL in the text part (given, or derived from the HTML) written in its text

The opener holds a random nonce made when the process starts, so no customer's data rendered
into a message can make a slot. A URL that only a customer's data puts in a message is left as
it is (the author did not write it); the rewriting path tracks one that equals a table link. What is filled in is exactly what the regular-expression path
would have written (the test compares the two on many templates), and where that cannot be
made sure of, the campaign keeps the regular-expression path:

  - a link in the link table written where a slot cannot go: inside an expression, a block, a
    comment, a tag built from expressions, or next to an expression that could lengthen it;
    any URL written in an expression (`{% set base = "https://shop" %}`);
  - text that a filter, set, macro, call or block tag or a recursive loop captures (a filter
    could change a slot), and `{% autoescape %}`;
  - HTML that uses `safe` (rendered data could open or close tags around a link);
  - an HTML-only campaign whose text must be converted per message (a slot is not a URL to the
    converter);
  - content that already holds the slot characters;
  - any difference between the two paths on a probe render (the check that this worked).
"""

from __future__ import annotations

import html
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import replace

from jinja2 import nodes

from ..domain.errors import InvalidCampaign
from ..domain.html_text import tidy
from ..domain.templates import (
    CampaignTemplates,
    LinkSlots,
    PartTemplate,
    TemplateRenderError,
    compile_part,
    probe_context,
)
from . import rewrite

# ASCII control characters that are neither white space nor markup: a part with slots stays an
# ASCII string (a private-use character would make every string built from it four times
# wider for Python, and each scan of it slower).
OPEN_CHAR = "\x1a"
CLOSER = "\x1b"
OPENER = OPEN_CHAR + secrets.token_hex(8)
_SAFE = re.compile(r"\|\s*safe\b")
# The nodes whose body is not written straight to the output (see `_Slotter.transform`).
_CAPTURING = (
    nodes.FilterBlock,
    nodes.AssignBlock,
    nodes.Macro,
    nodes.CallBlock,
    nodes.Block,
    nodes.ScopedEvalContextModifier,
    nodes.EvalContextModifier,
)
_DELIMITER = re.compile(r"""[\s<>"'()\[\]{}]""")  # what ends a URL for rewrite._URL


class SlotError(RuntimeError):
    """A slot came out of rendering changed: a bug in what decides a part may have slots."""


_NUMBERS = {str(n): n for n in range(1000)}  # a slot's number as it renders: one lookup


def _number(text: str) -> int:
    n = _NUMBERS.get(text)
    if n is None and text.isascii() and text.isdigit() and not text.startswith("0"):
        n = int(text)
    return -1 if n is None else n


def fill(body: str, opener: str, values: Sequence[str]) -> str:
    """`body` with slot n replaced by `values[n]`; SlotError if one is not whole (its number
    written other than as it renders, or its closer gone)."""
    pieces = body.split(opener)
    if len(pieces) == 1:
        return body
    out = [pieces[0]]
    count = len(values)
    for piece in pieces[1:]:
        number, closed, rest = piece.partition(CLOSER)
        n = _number(number)
        if not closed or not 0 <= n < count:
            raise SlotError("bug: a link slot came out of rendering changed")
        out.append(values[n])
        out.append(rest)
    return "".join(out)


def finish_html(body: str, slots: LinkSlots, values: Sequence[str]) -> str:
    """A message's HTML with its slots filled and the markers gone (as the rendered path
    leaves it: rewrite.rewrite_html, rewrite.strip_html_markers). Markers are looked for in
    every message: a customer's data can hold one too."""
    return rewrite.strip_html_markers(fill(body, slots.opener, values))


def finish_text(text: str, slots: LinkSlots, values: Sequence[str]) -> str:
    return rewrite.strip_markers(fill(text, slots.opener, values))


def written(slots: Sequence[tuple[str, str]]) -> list[str]:
    """Each slot's text as the author wrote it: what an untracked recipient gets."""
    return [as_written for _, as_written in slots]


class _Slotter:
    """Turns the links of one part's template text into slots, recording each."""

    def __init__(self, part: str, table: Mapping[str, int], skip_prefix: str) -> None:
        self.part = part
        self.table = table
        self.skip_prefix = skip_prefix
        self.slots: list[tuple[str, str]] = []
        self.unsafe = False  # a link in the table was written where no slot can go
        self._marked = 0

    def _slot(self, url: str, as_written: str) -> str:
        self.slots.append((url, as_written))
        return f"{OPENER}{len(self.slots) - 1}{CLOSER}"

    def _wanted(self, url: str) -> bool:
        return url in self.table and not url.startswith(self.skip_prefix)

    def transform(self, tree: nodes.Template) -> None:
        for const in tree.find_all(nodes.Const):
            # A URL written in an expression or a block (whole, or a part that expressions
            # complete: `{% set base = "https://shop" %}`) renders where no slot can be put.
            if isinstance(const.value, str) and "://" in const.value:
                self.unsafe = True
        if any(True for _ in tree.find_all(_CAPTURING)) or any(
            loop.recursive for loop in tree.find_all(nodes.For)
        ):
            # Text that a filter block, a set block, a macro, a call, a block or a recursive
            # loop captures can go through filters (`upper`, `truncate`, `wordwrap`) and come
            # out changed; `{% autoescape false %}` lets data open a tag around a link.
            self.unsafe = True
        for output in tree.find_all(nodes.Output):
            for node in output.nodes:
                if isinstance(node, nodes.TemplateData):
                    node.data = self._data(node.data)

    def _data(self, data: str) -> str:
        if self.part == "text":
            return self._text(data)
        before = len(self.slots)
        out = self._html(data)
        # Every href in this text naming a link of the table must have become a slot: one in
        # a tag that expressions complete (`<a href="..." class="{{ c }}">`) did not.
        hrefs = sum(self._wanted(_href_url(m)) for m in rewrite._HREF.finditer(data))
        if hrefs != len(self.slots) - before + self._marked:
            self.unsafe = True
        return out

    def _html(self, data: str) -> str:
        out: list[str] = []
        at = 0
        self._marked = 0  # hrefs of the table in marked tags of this text
        for tag in rewrite._ANCHOR.finditer(data):
            text = tag.group(0)
            if rewrite._NOTRACK.search(text):
                # Left to the same rule as untracked content: the marker goes.
                self._marked += sum(
                    self._wanted(_href_url(m)) for m in rewrite._HREF.finditer(text)
                )
                continue
            href = rewrite._HREF.search(text)
            if href is None:
                continue
            url = _href_url(href)
            if not self._wanted(url):
                continue
            start = tag.start() + href.start(2)
            out.append(data[at:start])
            out.append(self._slot(url, href.group(2)))
            at = tag.start() + href.end(2)
        out.append(data[at:])
        return "".join(out)

    def _text(self, data: str) -> str:
        out: list[str] = []
        at = 0
        for match in rewrite._URL.finditer(data):
            if match.group(1):
                continue  # marked: left to the same rule as untracked content
            raw = match.group(2)
            url = rewrite._clean(raw)
            if not self._wanted(url):
                continue
            if match.end() == len(data) or not _DELIMITER.search(data, 0, match.start()):
                # At an edge of the template's text: what renders next to it could make it a
                # longer URL (or swallow it into one), or mark it. (A URL always ends at a
                # delimiter; one must also come between the last link and this one.) The
                # part is not used; it is slotted on only so a test can show why.
                self.unsafe = True
            out.append(data[at : match.start()])
            out.append(self._slot(url, url))
            at = match.start() + len(url)
        out.append(data[at:])
        return "".join(out)


def _href_url(href: re.Match[str]) -> str:
    raw = href.group(3) or href.group(4) or href.group(5) or ""
    return (html.unescape(raw) if "&" in raw else raw).strip()


def _slotted_part(
    part: str, source: str, table: Mapping[str, int], skip: str
) -> tuple[PartTemplate, tuple[tuple[str, str], ...]] | None:
    if OPEN_CHAR in source or CLOSER in source:
        return None
    if part == "html" and _SAFE.search(source):
        return None
    slotter = _Slotter(part, table, skip)
    try:
        compiled = compile_part(part, source, slotter.transform)
    except InvalidCampaign:
        return None
    if slotter.unsafe:
        return None
    return compiled, tuple(slotter.slots)


def slotted(
    templates: CampaignTemplates, table: Mapping[str, int], skip_prefix: str
) -> CampaignTemplates:
    """`templates` with their HTML and text parts rendering links as slots, when that gives
    exactly what rewriting the rendered parts would; else `templates` unchanged."""
    if templates.slots is not None:
        return templates
    html_part = templates.html
    text_part = templates.text or templates.derived_text
    if html_part is None and text_part is None:
        return templates
    if html_part is not None and text_part is None:
        return templates  # its text is converted from each message's HTML
    got_html = _slotted_part("html", html_part.source, table, skip_prefix) if html_part else None
    got_text = _slotted_part("text", text_part.source, table, skip_prefix) if text_part else None
    if (html_part is not None and got_html is None) or (text_part is not None and got_text is None):
        return templates
    slots = LinkSlots(
        OPENER, html=got_html[1] if got_html else (), text=got_text[1] if got_text else ()
    )
    if not slots.html and not slots.text:
        return templates
    out = replace(
        templates,
        html=got_html[0] if got_html else None,
        text=got_text[0] if got_text and templates.text is not None else templates.text,
        derived_text=got_text[0] if got_text and templates.text is None else None,
        slots=slots,
    )
    if not _same_on_probe(templates, out, table, skip_prefix):
        return templates
    return out


def _same_on_probe(
    plain: CampaignTemplates, slotted_: CampaignTemplates, table: Mapping[str, int], skip: str
) -> bool:
    """Do slots filled give what rewriting the rendered parts gives, tracked and untracked?"""
    assert slotted_.slots is not None
    slots = slotted_.slots
    context = probe_context()

    def fake(n: int) -> str:
        return f"https://tracked.invalid/{n}?a=1&b=2"

    numbers = dict(table)
    try:
        if plain.html is not None and slotted_.html is not None:
            rendered = plain.html.render(context)
            with_slots = slotted_.html.render(context)
            tracked = rewrite.rewrite_html(rendered, numbers, fake, skip)
            values = ['"' + html.escape(fake(table[url])) + '"' for url, _ in slots.html]
            if finish_html(with_slots, slots, values) != tracked:
                return False
            untracked = rewrite.strip_html_markers(rendered)
            if finish_html(with_slots, slots, written(slots.html)) != untracked:
                return False
        before = plain.text or plain.derived_text
        after = slotted_.text or slotted_.derived_text
        if before is not None and after is not None:
            rendered, with_slots = before.render(context), after.render(context)
            if plain.text is None:  # derived: tidied as email_message does
                rendered, with_slots = tidy(rendered), tidy(with_slots)
            tracked = rewrite.rewrite_text(rendered, numbers, fake, skip)
            values = [fake(table[url]) for url, _ in slots.text]
            if finish_text(with_slots, slots, values) != tracked:
                return False
            untracked = rewrite.strip_markers(rendered)
            if finish_text(with_slots, slots, written(slots.text)) != untracked:
                return False
    except (TemplateRenderError, SlotError, KeyError):
        return False
    return True
