"""A split campaign's variants as content: each variant's overrides merged into the campaign's
`email` / `sms` and validated exactly as the campaign's own content is, and the campaign as one
variant sends it. A variant only substitutes content fields (email.subject/html/text, sms.body)
before the normal rendering, so templates, links and footers work the same for every variant.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import InvalidCampaign
from .messages import templates_of
from .models import Campaign, Channel, _parse_email, _parse_sms
from .splits import Split, Variant, parse_split


def parse_campaign_split(doc: dict[str, Any], channels: frozenset[Channel]) -> Split | None:
    """The document's split, each variant's merged content checked; None without variants."""
    split = parse_split(doc.get("variants"), doc.get("abTest"))
    if split is None:
        return None
    for i, variant in enumerate(split.variants):
        try:
            _merged(doc, variant, channels)
        except InvalidCampaign as exc:
            detail = f"variants[{i}] ({variant.key}): {exc.detail}"
            raise InvalidCampaign("bad_variants", detail) from None
    return split


def _merged(doc: dict[str, Any], variant: Variant, channels: frozenset[Channel]) -> None:
    if Channel.EMAIL in channels and variant.email:
        _parse_email({**_sub(doc.get("email")), **variant.email})
    if Channel.SMS in channels and variant.sms:
        _parse_sms({**_sub(doc.get("sms")), **variant.sms})


def _sub(raw: Any) -> dict[str, Any]:
    return dict(raw) if isinstance(raw, dict) else {}


def with_variant(campaign: Campaign, key: str) -> Campaign:
    """The campaign as variant `key` sends it (content overridden; everything else the same)."""
    split = campaign.split
    variant = split.variant(key) if split is not None else None
    if variant is None:
        raise KeyError(key)
    email, sms = campaign.email, campaign.sms
    if email is not None and variant.email:
        over = variant.email
        email = dataclasses.replace(
            email,
            subject=over.get("subject") or email.subject,
            html=over["html"] or None if "html" in over else email.html,
            text=over["text"] or None if "text" in over else email.text,
        )
    if sms is not None and variant.sms.get("body"):
        sms = dataclasses.replace(sms, body=variant.sms["body"])
    return dataclasses.replace(campaign, email=email, sms=sms)


def compile_content(campaign: Campaign) -> None:
    """Compile (and probe) the templates of the campaign and of each of its variants, as arming
    does; content that cannot render raises InvalidCampaign naming the variant, part and line."""
    templates_of(campaign)
    split = campaign.split
    if split is None:
        return
    for i, variant in enumerate(split.variants):
        try:
            templates_of(with_variant(campaign, variant.key))
        except InvalidCampaign as exc:
            detail = f"variants[{i}] ({variant.key}): {exc.detail}"
            raise InvalidCampaign(exc.reason, detail) from None
