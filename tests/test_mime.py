"""The MIME the SMTP sender builds: the header short cut writes exactly what compat32's folding
writes, bodies are quoted-printable that decodes to the text given, and the multipart boundary
(set, not searched for) never occurs in a part."""

from __future__ import annotations

import email
import email.policy
import random
import string

from reactor.adapters import smtp
from reactor.adapters.smtp import build_mime
from reactor.ports import EmailMessage


def test_the_header_short_cut_writes_what_compat32_writes() -> None:
    rng = random.Random(27)
    alphabet = string.ascii_letters + string.digits + "  \t=?<>@.;:,\"'()[]-_é"
    names = ["Subject", "To", "From", "Message-ID", "List-Unsubscribe", "X-A"]
    for policy in (smtp._POLICY, smtp._CRLF):
        reference = email.policy.compat32.clone(linesep=policy.linesep)
        for _ in range(20_000):
            name = rng.choice(names)
            value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 90)))
            if "é" in value and rng.random() < 0.5:
                value = value.replace("é", "e")
            expected = reference._fold(name, value, True)  # type: ignore[attr-defined]
            assert policy._fold(name, value, True) == expected, value


def _message(text: str | None, html: str | None) -> EmailMessage:
    return EmailMessage(
        to="c1@example.com",
        subject="Grüße, Ann — 20 % off",
        text=text,
        html=html,
        message_id="<m1@reactor.example>",
        headers=(("List-Unsubscribe", "<https://m.reactor.example/u/" + "t" * 90 + ">"),),
    )


TEXTS = [
    "plain ascii",
    "Grüße aus Köln — 20 % Rabatt ✓\nzweite Zeile\n",
    "trailing spaces   \nand tabs\t\n" + "a long line " * 40 + "\n=3D stays =3D\n",
    "\n\n.leading dot\nFrom the start of a line\n",
    "",
]


def test_bodies_decode_to_exactly_what_was_given_and_headers_survive() -> None:
    for text in TEXTS:
        html = f'<p>{text}</p><a href="https://shop.example/?a=1&b=2">x</a>'
        for part_text, part_html in ((text or "x", html), (text or "x", None), (None, html)):
            mime = build_mime(_message(part_text, part_html), "Shop <campaigns@reactor.example>")
            for raw in (mime.as_bytes(), mime.as_bytes(policy=smtp._CRLF)):
                head, _, body = raw.partition(b"\n\n" if b"\r\n" not in raw else b"\r\n\r\n")
                assert all(len(line) <= 998 for line in head.splitlines())  # RFC 5322
                assert all(len(line) <= 76 for line in body.splitlines())  # RFC 2045 QP
                parsed = email.message_from_bytes(raw, policy=email.policy.default)
                assert str(parsed["Subject"]) == "Grüße, Ann — 20 % off"
                assert parsed["To"] == "c1@example.com"
                assert parsed["List-Unsubscribe"].endswith("t" * 90 + ">")
                got = {
                    p.get_content_subtype(): p.get_content()
                    for p in parsed.walk()
                    if p.get_content_maintype() == "text"
                }
                want = {
                    k: v for k, v in (("plain", part_text), ("html", part_html)) if v is not None
                }
                # The generator writes the policy's line ending: compare line by line.
                assert {k: v.splitlines() for k, v in got.items()} == {
                    k: v.splitlines() for k, v in want.items()
                }


def test_the_boundary_cannot_occur_in_a_quoted_printable_part() -> None:
    hostile = "==" * 50 + "\n" + "=" * 15 + "==\n--" + "=" * 40
    mime = build_mime(_message(hostile, f"<p>{hostile}</p>"), "campaigns@reactor.example")
    boundary = mime.get_boundary()
    assert boundary is not None
    assert boundary.startswith("==")
    raw = mime.as_bytes().decode("ascii")
    # Only the Content-Type parameter and the three delimiter lines hold it, never a part.
    assert raw.count(boundary) == 4
    parsed = email.message_from_string(raw, policy=email.policy.default)
    parts = [p.get_content() for p in parsed.walk() if p.get_content_maintype() == "text"]
    assert [p.splitlines() for p in parts] == [
        hostile.splitlines(),
        f"<p>{hostile}</p>".splitlines(),
    ]
    assert build_mime(_message("a", "b"), "c@x.example").get_boundary() != boundary


def test_the_generator_writes_the_bytes_the_stock_one_writes() -> None:
    """`to_bytes` writes each body in one piece where the stock generator writes it a line
    at a time: the same bytes, for every kind of line ending a body can hold."""
    rng = random.Random(5)
    pieces = ["a", "é", " ", "=", ".", "\n", "\r\n", "\r", "\t", "x" * 80, "✓", "--", "From "]
    texts = TEXTS + [
        "".join(rng.choice(pieces) for _ in range(rng.randrange(200))) for _ in range(300)
    ]
    for text in texts:
        html = f"<p>{text}</p>"
        for part_text, part_html in ((text or "x", html), (text or "x", None), (None, html)):
            mime = build_mime(_message(part_text, part_html), "Shop <campaigns@reactor.example>")
            assert smtp.to_bytes(mime) == mime.as_bytes()
            assert smtp.to_bytes(mime, smtp._CRLF) == mime.as_bytes(policy=smtp._CRLF)
