"""The text part of an HTML-only email, generated from its rendered HTML.

One function, `html_to_text`, so the converter can be changed in one place. It is inscriptis
(Apache-2.0, well kept) with a profile for email HTML: layout tables read as blocks (a newsletter
is tables inside tables; laid out as columns they become 150-character lines of spaces), a link
reads "text (url)", an image its alt text. docs/templates.md records the comparison with
html2text that chose it.
"""

from __future__ import annotations

import re
from typing import Any

from inscriptis import get_text
from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.html_properties import Display
from inscriptis.model.config import ParserConfig
from inscriptis.model.html_element import HtmlElement
from inscriptis.model.tag import CustomHtmlTagHandlerMapping

_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS = re.compile(r"\n{3,}")


def _noop(state: Any, attrs: Any = None) -> None:
    return None


def _a_start(state: Any, attrs: dict[str, str]) -> None:
    state.link_target = attrs.get("href", "").strip()


def _a_end(state: Any) -> None:
    target = state.link_target
    if target.startswith(("http://", "https://")):
        state.tags[-1].write(f" ({target})")
    state.link_target = ""


def _img_start(state: Any, attrs: dict[str, str]) -> None:
    alt = (attrs.get("alt") or "").strip()
    if alt:
        state.tags[-1].write(alt)


def _config() -> ParserConfig:
    css = dict(CSS_PROFILES["strict"])
    for tag in ("table", "tr", "td", "th", "tbody", "thead", "tfoot"):
        css[tag] = HtmlElement(display=Display.block)
    for tag in ("h1", "h2", "h3"):
        css[tag] = HtmlElement(display=Display.block, margin_before=1, margin_after=1)
    table_tags = dict.fromkeys(("table", "tr", "td", "th"), _noop)
    return ParserConfig(
        css=css,
        custom_html_tag_handler_mapping=CustomHtmlTagHandlerMapping(
            start_tag_mapping={**table_tags, "a": _a_start, "img": _img_start},
            end_tag_mapping={**table_tags, "a": _a_end},
        ),
    )


_CONFIG = _config()


def html_to_text(html: str) -> str:
    """Readable plain text for `html`: block structure kept, links as "text (url)"."""
    if not html.strip():
        return ""
    text = get_text(html, _CONFIG)
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip("\n") + "\n"
