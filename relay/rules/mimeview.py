"""A decoded, text-only view of one message, for the rules in `relay.rules`.

Built once per classification and lazy: the body is parsed and decoded only when
a rule asks for it, and then only its first PARSE_LIMIT bytes, and not at all past
MAX_PARTS or MAX_NESTING (see `MailView._message`). Nothing here raises on
bad input: broken MIME, unknown charsets, bad base64 and 8-bit garbage decode
to what can be read, with U+FFFD for the rest.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import email.policy
import html
import itertools
import logging
import quopri
import re
from email.message import Message
from email.parser import BytesParser
from functools import cached_property
from html.parser import HTMLParser

from relay import logs
from relay.mail import Mail, header_block

log = logging.getLogger("relay.rules")

_ENCODED_WORD = re.compile(r"=\?([^?\s]+)\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t\r\n]+(?==\?)")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_NEXT_FIELD = re.compile(rb"\n(?![ \t])")  # the end of a header field's last line
# Rules see at most this much of any one header (Postfix's header_size_limit); the mail
# itself goes out whole. A regex that backtracks can take time growing with the square of
# a value's length, or worse, and classification runs on the delivery loop.
HEADER_LIMIT = 102_400
# ... and of any one text part (as text, and as text again once an HTML part's tags are
# gone). Unbounded, `body: 'reengagement.*reminder'` on a 1 MB line of "reengagement "
# ran for minutes: the delivery process stopped answering, was killed and restarted, and
# took the same mail again. Moodle's markers are near the top of a mail of a few KB.
BODY_LIMIT = 102_400
# ... and the fields in the first this many bytes of the header block, so cut: Moodle's
# are a few KB. 700,000 short header lines (7.7 MB) took the parse past a rule's time limit.
HEAD_LIMIT = 262_144
# The body rules and `multipart` read: the first PARSE_LIMIT bytes of the mail, parsed
# only with at most MAX_PARTS boundary lines and MAX_NESTING multipart heads in them.
# Whole, 10 MiB of empty parts took the email package 10 s (2 s a mail, each rule
# stopped at its time limit, with a parse started again for the next one); 16 such mails
# in one claim stopped the delivery loop until it was killed as hung, again at each start.
PARSE_LIMIT = 1_048_576
MAX_PARTS = 500  # SES refuses a mail of more MIME parts
MAX_NESTING = 100  # Postfix's mime_nesting_limit
# A line that may be a MIME boundary: "--" and more than dashes and blanks (Moodle's forum
# digests put two lines of dashes in each post, and a signature starts "-- ").
_BOUNDARY_LINE = re.compile(rb"^--(?![-\t ]*\r?$)", re.MULTILINE)
_HTML_BREAKS = frozenset(
    {"br", "p", "div", "tr", "li", "h1", "h2", "h3", "h4", "h5", "h6", "table", "blockquote"}
)


def _charset_decode(data: bytes, charset: str | None) -> str:
    """`data` as text in `charset` (unknown or missing: UTF-8), unreadable bytes replaced."""
    name = (charset or "utf-8").strip().strip('"').lower() or "utf-8"
    if name in ("us-ascii", "ascii"):
        name = "utf-8"  # 8-bit bytes labelled ASCII are almost always UTF-8 in practice
    try:
        codecs.lookup(name)
    except LookupError:
        name = "utf-8"
    try:
        return data.decode(name, errors="replace")
    except Exception:  # a codec may still refuse odd input
        return data.decode("utf-8", errors="replace")


def _decode_word(match: re.Match[str]) -> str:
    charset, encoding, text = match.group(1), match.group(2).upper(), match.group(3)
    charset = charset.split("*", 1)[0]  # RFC 2231 language suffix
    try:
        if encoding == "B":
            data = base64.b64decode(text + "=" * (-len(text) % 4))
        else:
            data = quopri.decodestring(text.replace("_", " ").encode("ascii"), header=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return match.group(0)
    return _charset_decode(data, charset)


def decode_header(value: str) -> str:
    """An unfolded header value with its RFC 2047 encoded words decoded."""
    unfolded = _FOLD.sub("", value)
    joined = _BETWEEN_WORDS.sub(r"\1", unfolded)  # whitespace between encoded words is dropped
    text = _ENCODED_WORD.sub(_decode_word, joined)
    # Undecodable raw 8-bit bytes come through the parser as surrogates.
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in _HTML_BREAKS:
            self.chunks.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in _HTML_BREAKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)


def html_to_text(markup: str) -> str:
    """The visible text of `markup`: no tags, comments, scripts or styles; entities unescaped."""
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # HTMLParser is lenient, but never let markup stop classification
        return html.unescape(re.sub(r"<[^>]*>", " ", markup))
    return "".join(parser.chunks)


# Header rules (the shipped defaults) need only the header block: parse the MIME tree
# only when a body or multipart condition asks for it.
# compat32: raw_items() are the same, and it leaves Content-Type unparsed (policy.default's
# header registry parsed it at the end of every head: most of a classification's time)
# The body's parse (`MailView._message`) takes it too: the same tree at a third of the cost.
_PARSER = BytesParser(policy=email.policy.compat32)


def _bounded(mail: Mail, block: bytes) -> bytes:
    """The header block as rules read it: each field cut to HEADER_LIMIT bytes, and no
    more fields once HEAD_LIMIT bytes of them are read (said in the log). A field's end
    (the next line that does not start with WSP: RFC 5322 2.2.3) is found at C speed, so
    a field of millions of folded lines costs no Python loop."""
    if len(block) <= HEAD_LIMIT:
        return block
    kept: list[bytes] = []
    total = pos = 0
    while pos < len(block) and total < HEAD_LIMIT:
        after = _NEXT_FIELD.search(block, pos)
        end = len(block) if after is None else after.end()
        field, pos = block[pos:end], end
        if len(field) > HEADER_LIMIT:  # cut at a line's end: no CR left alone before it
            field = field[:HEADER_LIMIT].rstrip(b"\r\n") + b"\r\n"
        kept.append(field)
        total += len(field)
    if pos < len(block):
        logs.event(log, "headers_cut", id=mail.id, bytes=len(block), limit=HEAD_LIMIT)
    return b"".join(kept)


class MailView:
    """What rules look at: decoded headers, envelope and body texts of one Mail."""

    def __init__(self, mail: Mail) -> None:
        self.mail = mail

    @cached_property
    def _message(self) -> Message | None:
        """The MIME tree of the mail's first PARSE_LIMIT bytes; None (no body, no part: the
        body and multipart rules do not hold) past MAX_PARTS or MAX_NESTING there. Counted
        at C speed before the parse, whose cost grows with the parts and their depth."""
        raw = self.mail.raw[:PARSE_LIMIT]
        parts = sum(1 for _ in itertools.islice(_BOUNDARY_LINE.finditer(raw), MAX_PARTS + 1))
        heads = raw.lower().count(b"multipart/")
        if parts > MAX_PARTS or heads > MAX_NESTING:
            logs.event(
                log,
                "body_not_read",
                level=logging.WARNING,
                id=self.mail.id,
                boundaries=parts,
                multiparts=heads,
            )
            return None
        try:
            return _PARSER.parsebytes(raw)
        except Exception:  # the parser records defects, but be sure: no message, no match
            return None

    @cached_property
    def _head(self) -> Message | None:
        try:
            block = _bounded(self.mail, header_block(self.mail.raw))
            return _PARSER.parsebytes(block, headersonly=True)
        except Exception:  # no header block, no match
            return None

    @cached_property
    def headers(self) -> dict[str, tuple[str, ...]]:
        """Every header's decoded values, by lower-case name, in order of appearance."""
        found: dict[str, list[str]] = {}
        message = self._head
        if message is None:
            return {}
        try:
            items = list(message.raw_items())
        except Exception:
            return {}
        for name, value in items:
            try:
                text = decode_header(str(value)[:HEADER_LIMIT])
                found.setdefault(str(name).strip().lower(), []).append(text)
            except Exception:
                continue
        return {name: tuple(values) for name, values in found.items()}

    def header(self, name: str) -> tuple[str, ...]:
        return self.headers.get(name.lower(), ())

    @property
    def subject(self) -> str:
        """The first Subject, decoded; "" when there is none."""
        values = self.header("subject")
        return values[0] if values else ""

    @cached_property
    def _leaves(self) -> tuple[tuple[str, str], ...]:
        """(content type, decoded text or "") for every non-multipart part."""
        message = self._message
        if message is None:
            return ()
        leaves: list[tuple[str, str]] = []
        try:
            parts = list(message.walk())
        except Exception:
            return ()
        for part in parts:
            try:
                if part.is_multipart():
                    continue
                ctype = part.get_content_type()
                text = ""
                if ctype in ("text/plain", "text/html") and (
                    part.get_content_disposition() != "attachment"
                ):
                    payload = part.get_payload(decode=True)
                    if isinstance(payload, bytes):
                        text = _charset_decode(payload, part.get_content_charset())
                leaves.append((ctype, text))
            except Exception:
                leaves.append(("application/octet-stream", ""))
        return tuple(leaves)

    @property
    def part_count(self) -> int | None:
        """How many body parts (non-multipart leaves) the message has; None when its body
        was not read (see `_message`): neither multipart nor not."""
        return None if self._message is None else len(self._leaves)

    @cached_property
    def body_texts(self) -> tuple[str, ...]:
        """Texts a `body` rule searches: each text part, and each HTML part also as plain text,
        the first BODY_LIMIT characters of each."""
        texts: list[str] = []
        for ctype, text in self._leaves:
            if not text:
                continue
            texts.append(text[:BODY_LIMIT])
            if ctype == "text/html":
                texts.append(html_to_text(text[: 4 * BODY_LIMIT])[:BODY_LIMIT])
        return tuple(texts)
