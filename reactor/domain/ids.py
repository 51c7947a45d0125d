"""Customer ids as both databases spell them."""

from __future__ import annotations

from typing import Any


def normalise_id(value: Any) -> str:
    """One spelling per customer id whether a database stores it as a string or a number."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def id_variants(value: Any) -> list[Any]:
    """The forms an id may take in the orders collection: "42" and 42 both match customer 42."""
    text = normalise_id(value)
    variants: list[Any] = [text]
    if text.lstrip("-").isdigit() and str(int(text)) == text:
        variants.append(int(text))
    return variants
