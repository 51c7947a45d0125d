"""Customer ids as both databases spell them.

A Node/Mongoose backend writes ids as strings, 32- or 64-bit integers, doubles (the Node driver
stores integers beyond 32 bits as doubles) or ObjectIds — or as the string spellings of any of
these — and the campaign and the orders collection need not agree. `normalise_id` gives every
spelling of one customer the same key; `id_variants` gives the values to look that customer up
with, whatever type the orders collection stores.
"""

from __future__ import annotations

import re
from typing import Any

from bson import ObjectId

_OBJECT_ID = re.compile(r"^[0-9a-fA-F]{24}$")
_INTEGRAL_DOUBLE = re.compile(r"^-?\d+\.0*$")
_MAX_EXACT = 2**53  # doubles hold every integer up to here


def normalise_id(value: Any) -> str:
    """One spelling per customer: "42", 42, Int64(42), 42.0 and "42.0" are all "42"; an ObjectId
    and its hex string are the same lower-case hex."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= _MAX_EXACT:
        return str(int(value))
    if isinstance(value, ObjectId):
        return str(value)
    text = str(value).strip()
    if _OBJECT_ID.match(text):
        return text.lower()
    if _INTEGRAL_DOUBLE.match(text):
        whole = text.split(".", 1)[0]
        if str(int(whole)) == whole:  # "42.0", not "007.0"
            return whole
    return text


def id_variants(value: Any) -> list[Any]:
    """The values that customer's order rows may hold: the string (as written and normalised),
    the number (which matches int, long and double alike) and the ObjectId."""
    raw = str(value).strip()
    text = normalise_id(value)
    variants: list[Any] = [text] if raw == text else [text, raw]
    if re.fullmatch(r"-?\d+", text) and str(int(text)) == text:  # "42", not "007"
        number = int(text)
        variants.append(number)
        if abs(number) <= _MAX_EXACT:
            variants.append(f"{number}.0")  # a double's string spelling
    if _OBJECT_ID.match(text):
        variants.append(ObjectId(text))
        if raw != text:
            variants.append(raw)
    return list(dict.fromkeys(variants))
