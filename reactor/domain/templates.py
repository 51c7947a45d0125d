"""Personalisation: `{{name}}`, `{{email}}`, `{{phone}}`, `{{unsubscribe_url}}` and nothing else.

A deliberately tiny engine: it substitutes known placeholders from a flat mapping and leaves
anything else as written. It cannot evaluate expressions, call functions or reach attributes,
so campaign content written by marketers can never execute code in the reactor.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

PLACEHOLDER = re.compile(r"\{\{\s*(name|email|phone|unsubscribe_url)\s*\}\}")


def render(template: str, values: Mapping[str, str], *, escape_html: bool = False) -> str:
    def substitute(match: re.Match[str]) -> str:
        value = values.get(match.group(1), "")
        return html.escape(value) if escape_html else value

    return PLACEHOLDER.sub(substitute, template)
