"""The SES checks of `relay doctor`: account, identities, configuration sets, sample mail.

    ses        credentials and quota (GetSendQuota), sending enabled, sandbox (SESv2 GetAccount)
    identity   each sender and From domain once: it, or a parent domain, verified (SES lets
               a verified domain send from its subdomains); else the addresses seen verified
    configset  each configuration set named in relay.yaml and rules.yaml exists
    sample     a DKIM-Signature in sample mail over a header SES rewrites (Message-ID, Date)
               or sets (Return-Path, Bounces-To) breaks at the recipient

`check()` returns the lines and what the DNS checks need: the domains of the identities
(for DKIM and DMARC) and their custom MAIL FROM domains (for SPF: only those need
`include:amazonses.com`; SES's default MAIL FROM is its own).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesHeaderParser
from email.utils import parseaddr
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from relay.deliver.ses import client as ses_mod
from relay.errors import DeliveryError
from relay.settings import Ses, Suppressed

OK, WARN, FAIL = "ok", "warn", "FAIL"
Line = tuple[str, str, str]
ADDRESSES_ASKED = 10  # addresses of an unverified domain asked about, at most
PROBE = "relay-doctor-probe@example.com"  # asked of the suppression list (not expected on it)
# SES overwrites Date and Message-ID and sets Return-Path; its manual DKIM signing guide
# says not to sign these, nor Bounces-To.
REWRITTEN = ("message-id", "date", "return-path", "bounces-to")
_TAG = re.compile(r"\s*([a-z]+)\s*=\s*(.*?)\s*(?:;|$)", re.S)


@dataclass(slots=True)
class Found:
    """Lines to print; identity domains for DKIM/DMARC; domain -> custom MAIL FROM (None:
    SES's own), or why that is unknown."""

    lines: list[Line] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    mail_from: dict[str, str | None] | str = field(default_factory=dict)


async def check(
    settings: Ses,
    configuration_sets: Sequence[str],
    senders: Sequence[str],
    samples: Sequence[tuple[str, bytes]],
) -> Found:
    """Every SES line of the doctor, in order; `samples` are (file name, bytes)."""
    found = Found()
    region = settings.region
    try:
        client = await ses_mod.SesClient.open(settings)
    except Exception as exc:  # a bad region or endpoint URL: say so, do not crash the doctor
        found.lines.append((FAIL, "ses", f"cannot create an SES client for {region}: {exc}"))
        found.mail_from = "no SES client"
        return found
    async with client:
        if not await _account(found.lines, client, settings):
            found.mail_from = "SES unusable"
            return found
        await _suppression_lookups(found.lines, settings)
        froms = [(name, _from_address(raw)) for name, raw in samples]
        found.identities = await _identities(found.lines, client, settings, senders, froms)
        for name in dict.fromkeys(configuration_sets):
            try:
                exists = await client.configuration_set_exists(name)
            except DeliveryError as exc:
                found.lines.append((FAIL, "configset", f"{name}: {exc.reply}"))
                continue
            found.lines.append(
                (OK, "configset", f"{name}: exists")
                if exists
                else (FAIL, "configset", f"{name}: does not exist in {region}: create it")
            )
    for name, raw in samples:
        found.lines.extend(dkim_lines(name, raw))
    found.mail_from = await _mail_from(settings, found.identities)
    return found


async def _account(lines: list[Line], client: ses_mod.SesClient, settings: Ses) -> bool:
    """Quota, sending enabled, sandbox; False when SES cannot be used at all."""
    region = settings.region
    try:
        quota = await client.quota()
    except DeliveryError as exc:
        why = f"credentials or endpoint unusable (GetSendQuota in {region}): {exc.reply}"
        lines.append((FAIL, "ses", why))
        return False
    daily = "unlimited" if quota.max_24h < 0 else f"{quota.max_24h:g}"
    usage = (
        f"credentials valid ({region}); max send rate {quota.max_send_rate:g}/s; "
        f"sent {quota.sent_last_24h:g} of {daily} in the last 24 h"
    )
    spent = 0 <= quota.max_24h <= quota.sent_last_24h
    lines.append((FAIL, "ses", f"{usage}: daily quota spent") if spent else (OK, "ses", usage))
    try:
        enabled = await client.sending_enabled()
    except DeliveryError as exc:  # relay never needs this call to send: a warning only
        lines.append((WARN, "ses", f"sending state unknown: GetAccountSendingEnabled: {exc.reply}"))
    else:
        lines.append(
            (OK, "ses", "sending enabled")
            if enabled
            else (FAIL, "ses", "sending paused for the account: resume it in the SES console")
        )
    account = await _v2_call(settings, "get_account")
    if isinstance(account, str):
        lines.append((WARN, "ses", f"sandbox state unknown: GetAccount: {account}"))
    elif account.get("ProductionAccessEnabled"):
        lines.append((OK, "ses", f"production access ({region}): not in the sandbox"))
    else:
        q = account.get("SendQuota", {})
        lines.append(
            (
                FAIL,
                "ses",
                f"in the SES sandbox in {region} (at most {q.get('Max24HourSend', 200):g} a day,"
                " only to verified addresses): students' mail is refused and goes upstream;"
                " request production access",
            )
        )
    return True


async def _suppression_lookups(lines: list[Line], settings: Ses) -> None:
    """Whether relay may ask the suppression list before each send (`ses.suppressed`):
    when it may not, every lookup fails and every recipient goes to SES, which drops the
    listed ones (a Bounce event is then all that says so)."""
    if settings.suppressed is Suppressed.SEND:
        return
    answer = await _v2_call(settings, "get_suppressed_destination", EmailAddress=PROBE)
    mode = f"ses.suppressed: {settings.suppressed.value}"
    if isinstance(answer, dict) or answer.startswith("NotFoundException"):
        lines.append((OK, "ses", f"suppression list lookups allowed ({mode})"))
    elif answer.startswith("AccessDenied"):
        code = answer.split(":", 1)[0]
        why = (
            f"suppression list lookups refused ({mode}; GetSuppressedDestination: {code}):"
            " grant ses:GetSuppressedDestination, or set ses.suppressed: send; until then"
            " SES drops listed recipients"
        )
        lines.append((FAIL, "ses", why))
    else:
        lines.append((WARN, "ses", f"suppression list lookups unknown ({mode}): {answer}"))


async def _identities(
    lines: list[Line],
    client: ses_mod.SesClient,
    settings: Ses,
    senders: Sequence[str],
    froms: Sequence[tuple[str, str]],
) -> list[str]:
    """Each sender and From domain once; the identities that cover them (for DNS)."""
    region = settings.region
    # domain -> (what uses it, addresses seen): with ses.source set, only it is the Source
    wanted: dict[str, tuple[str, list[str]]] = {}
    for role, address in [
        *(("Source", a) for a in ([settings.source] if settings.source else senders)),
        *((f"From of {name}", a) for name, a in froms if a),
    ]:
        domain = address.rpartition("@")[2].lower().rstrip(".")
        if not domain:
            continue
        entry = wanted.setdefault(domain, (role, []))
        if "@" in address and address not in entry[1]:
            entry[1].append(address)
    if not wanted:
        lines.append((WARN, "identity", "no senders known: pass --sender or --sample"))
        return []
    covering: list[str] = []
    for domain, (role, addresses) in wanted.items():
        parents = _parents(domain)
        asked = [*parents, *addresses[:ADDRESSES_ASKED]]
        try:
            status = await client.identity_statuses(asked)
        except DeliveryError as exc:
            lines.append((FAIL, "identity", f"{domain}: {exc.reply}"))
            continue
        verified = [d for d in parents if status.get(d) == "Success"]
        count = f" ({len(addresses)} address{'es' * (len(addresses) != 1)} seen)" * bool(addresses)
        if verified:
            via = "verified" if verified[0] == domain else f"covered by verified {verified[0]}"
            lines.append((OK, "identity", f"{domain} ({role}): {via}{count}"))
            covering.append(verified[0])
            continue
        if addresses and all(status.get(a) == "Success" for a in addresses[:ADDRESSES_ASKED]):
            lines.append(
                (
                    WARN,
                    "identity",
                    f"{domain} ({role}): only the addresses {', '.join(addresses[:3])} are"
                    f" verified, not the domain: any other address (VERP) is refused; verify"
                    f" domain {domain} in {region}",
                )
            )
            continue
        fix = f"verify domain {domain} in {region}"
        if role == "Source":
            fix += ", or set ses.source to an address of a verified domain"
        lines.append((FAIL, "identity", f"{domain} ({role}): not verified in SES: {fix}"))
    return list(dict.fromkeys(covering))


def _parents(domain: str) -> list[str]:
    """`domain` and its parent domains, nearest first (not the top-level domain)."""
    labels = domain.split(".")
    return [".".join(labels[i:]) for i in range(max(len(labels) - 1, 1))]


def _from_address(raw: bytes) -> str:
    value = BytesHeaderParser(policy=policy.compat32).parsebytes(raw).get("From")
    return parseaddr(str(value))[1] if value is not None else ""


def dkim_lines(name: str, raw: bytes) -> list[Line]:
    """A warn line for each DKIM-Signature of `raw` that signs a header SES rewrites."""
    headers = BytesHeaderParser(policy=policy.compat32).parsebytes(raw)
    lines: list[Line] = []
    signatures = headers.get_all("DKIM-Signature") or []
    for signature in signatures:
        tags = dict(_TAG.findall(" ".join(str(signature).split())))
        signed = [h.strip().lower() for h in tags.get("h", "").split(":")]
        bad = [h for h in REWRITTEN if h in signed]
        domain = tags.get("d", "?")
        if bad:
            lines.append(
                (
                    WARN,
                    "sample",
                    f"{name}: DKIM-Signature d={domain} signs {', '.join(bad)}, which SES"
                    " rewrites: the signature breaks; sign without them, or leave signing"
                    " to SES (Easy DKIM)",
                )
            )
        else:
            lines.append((OK, "sample", f"{name}: DKIM-Signature d={domain} survives SES"))
    if not signatures:
        lines.append((OK, "sample", f"{name}: no DKIM-Signature (SES signs with Easy DKIM)"))
    return lines


async def _mail_from(settings: Ses, identities: list[str]) -> dict[str, str | None] | str:
    """GetIdentityMailFromDomainAttributes: identity -> custom MAIL FROM domain or None."""
    if not identities:
        return {}
    found = await _v1_call(
        settings, "get_identity_mail_from_domain_attributes", Identities=identities
    )
    if isinstance(found, str):
        return f"GetIdentityMailFromDomainAttributes: {found}"
    attributes = found.get("MailFromDomainAttributes", {})
    return {i: attributes.get(i, {}).get("MailFromDomain") or None for i in identities}


async def _v1_call(settings: Ses, method: str, **params: Any) -> dict[str, Any] | str:
    return await _call(settings, "ses", method, **params)


async def _v2_call(settings: Ses, method: str, **params: Any) -> dict[str, Any] | str:
    return await _call(settings, "sesv2", method, **params)


async def _call(settings: Ses, service: str, method: str, **params: Any) -> dict[str, Any] | str:
    """One call on a client of its own (calls the deliver path never makes); the answer,
    or SES's reply when it failed."""
    config = AioConfig(
        retries={"total_max_attempts": 1},
        read_timeout=settings.timeout,
        connect_timeout=min(ses_mod.CONNECT_TIMEOUT, settings.timeout),
    )
    creator = get_session().create_client(
        service, region_name=settings.region, endpoint_url=settings.endpoint_url, config=config
    )
    try:
        async with creator as client, asyncio.timeout(settings.timeout + 5):
            answer: dict[str, Any] = await getattr(client, method)(**params)
    except Exception as exc:  # mapped like every SES error; an emulator may lack the call
        return ses_mod.failure(exc, method).reply
    return answer
