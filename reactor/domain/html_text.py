"""The text part of an HTML-only email, generated from its rendered HTML.

One function, `html_to_text`, so the converter can be changed in one place. It is inscriptis
(Apache-2.0, well kept) with a profile for email HTML: layout tables read as blocks (a newsletter
is tables inside tables; laid out as columns they become 150-character lines of spaces), a link
reads "text (url)", an image its alt text. docs/templates.md records the comparison with
html2text that chose it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
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


def _a_end_handler(shown: Callable[[str], bool]) -> Callable[[Any], None]:
    def a_end(state: Any) -> None:
        target = state.link_target
        if shown(target):
            state.tags[-1].write(f" ({target})")
        state.link_target = ""

    return a_end


def _web_link(target: str) -> bool:
    return target.startswith(("http://", "https://"))


def _img_start(state: Any, attrs: dict[str, str]) -> None:
    alt = (attrs.get("alt") or "").strip()
    if alt:
        state.tags[-1].write(alt)


def _config(shown: Callable[[str], bool]) -> ParserConfig:
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
            end_tag_mapping={**table_tags, "a": _a_end_handler(shown)},
        ),
    )


_CONFIG = _config(_web_link)
# A link whose whole target is a template expression (`href="{{ unsubscribe_url }}"`) is shown
# too when a template's text is derived from its HTML source (templates.derive_text_part).
PLACEHOLDER = re.compile(r"JXPR(\d{5})QZ")
_CONFIG_PLACEHOLDERS = _config(lambda t: _web_link(t) or PLACEHOLDER.match(t) is not None)


def html_to_text(html: str, *, placeholders: bool = False) -> str:
    """Readable plain text for `html`: block structure kept, links as "text (url)"."""
    if not html.strip():
        return ""
    return tidy(get_text(html, _CONFIG_PLACEHOLDERS if placeholders else _CONFIG))


def tidy(text: str) -> str:
    """No trailing spaces, no runs of blank lines, one final newline."""
    text = _TRAILING_SPACE.sub("", text)
    return _BLANK_RUNS.sub("\n\n", text).strip("\n") + "\n"
