"""The DNS a sender domain needs for SES mail, checked for `relay doctor`.

    spf        the domain's one `v=spf1` TXT record has `include:amazonses.com`
    easy_dkim  each SES Easy DKIM token (`dkim_tokens`, GetIdentityDkimAttributes) has
               `<token>._domainkey.<domain>` CNAME `<token>.dkim.amazonses.com`
    dmarc      `_dmarc.<domain>` has a `v=DMARC1` TXT record

Each check returns a one-line summary or raises `RecordProblem` naming the record.
Lookups are short (DNS_TIMEOUT): a doctor that hangs on DNS helps nobody.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.resolver
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from relay import settings as settings_mod
from relay.deliver.ses import client as ses_mod

DNS_TIMEOUT = 2.0  # seconds per lookup

Dkim = dict[str, tuple[list[str], str]]  # domain -> (Easy DKIM tokens, SES DKIM status)


class RecordProblem(Exception):
    """A record is missing or wrong (or, with `warning`, could not be checked)."""

    def __init__(self, message: str, *, warning: bool = False) -> None:
        super().__init__(message)
        self.warning = warning


async def dkim_tokens(ses: settings_mod.Ses, domains: list[str]) -> Dkim | str:
    """GetIdentityDkimAttributes (not a call SesClient offers): tokens per domain, or why not."""
    if not domains:
        return {}
    config = AioConfig(
        retries={"total_max_attempts": 1},
        read_timeout=ses.timeout,
        connect_timeout=min(ses_mod.CONNECT_TIMEOUT, ses.timeout),
    )
    creator = get_session().create_client(
        "ses", region_name=ses.region, endpoint_url=ses.endpoint_url, config=config
    )
    try:
        async with creator as client, asyncio.timeout(ses.timeout + 5):
            r: dict[str, Any] = await client.get_identity_dkim_attributes(Identities=domains)
    except Exception as exc:  # mapped like every SES error; an emulator may lack the call
        return f"GetIdentityDkimAttributes: {ses_mod.failure(exc, 'DKIM attributes').reply}"
    found = r.get("DkimAttributes", {})
    return {
        d: (list(a.get("DkimTokens", [])), str(a.get("DkimVerificationStatus")))
        for d, a in found.items()
    }


def resolver(nameserver: str | None) -> dns.asyncresolver.Resolver:
    """The system resolver, or `nameserver` given as IP, IP:PORT or [IPv6]:PORT."""
    if nameserver is None:
        chosen = dns.asyncresolver.Resolver()
    else:
        host, port = nameserver, "53"
        if nameserver.startswith("["):
            host, _, port = nameserver[1:].partition("]")
            port = port.lstrip(":") or "53"
        elif nameserver.count(":") == 1:
            host, port = nameserver.split(":")
        chosen = dns.asyncresolver.Resolver(configure=False)
        chosen.nameservers, chosen.port = [host], int(port)
    chosen.timeout = chosen.lifetime = DNS_TIMEOUT
    return chosen


async def lookup(resolver: dns.asyncresolver.Resolver, name: str, rdtype: str) -> list[str]:
    """TXT strings (joined per record) or other records as text; RecordProblem when none."""
    try:
        answer = await resolver.resolve(name, rdtype)
    except dns.resolver.NXDOMAIN as exc:
        raise RecordProblem(f"{name} {rdtype}: does not exist (NXDOMAIN)") from exc
    except dns.resolver.NoAnswer as exc:
        raise RecordProblem(f"{name} {rdtype}: no {rdtype} record") from exc
    except dns.exception.Timeout as exc:
        raise RecordProblem(f"{name} {rdtype}: no answer within {DNS_TIMEOUT:g} s") from exc
    except dns.exception.DNSException as exc:
        raise RecordProblem(f"{name} {rdtype}: lookup failed: {exc}") from exc
    if rdtype == "TXT":
        return [b"".join(r.strings).decode(errors="replace") for r in answer]
    return [r.to_text().rstrip(".").lower() for r in answer]


async def spf(resolver: dns.asyncresolver.Resolver, domain: str) -> str:
    """Exactly one SPF record, including amazonses.com."""
    records = await lookup(resolver, domain, "TXT")
    found = [t for t in records if t.lower().startswith("v=spf1")]
    if len(found) != 1:
        raise RecordProblem(f"{domain} TXT: {len(found)} SPF records (v=spf1), need exactly one")
    if "include:amazonses.com" not in found[0].lower().split():
        raise RecordProblem(f"{domain} TXT: SPF does not include:amazonses.com: {found[0]}")
    return f"{domain}: {found[0]}"


async def easy_dkim(resolver: dns.asyncresolver.Resolver, domain: str, dkim: Dkim | str) -> str:
    """Every Easy DKIM token's CNAME points at SES (`dkim` as `dkim_tokens` returned it)."""
    if isinstance(dkim, str):
        raise RecordProblem(
            f"{domain}: Easy DKIM tokens unknown ({dkim}); not checked", warning=True
        )
    tokens, status = dkim.get(domain, ([], ""))
    if not tokens:
        raise RecordProblem(f"{domain}: Easy DKIM is not set up in SES (no DKIM tokens)")
    for token in tokens:
        name, want = f"{token}._domainkey.{domain}", f"{token}.dkim.amazonses.com"
        got = await lookup(resolver, name, "CNAME")
        if got != [want]:
            raise RecordProblem(f"{name} CNAME: {', '.join(got)}, expected {want}")
    return f"{domain}: {len(tokens)} CNAMEs to SES Easy DKIM (SES status {status})"


async def dmarc(resolver: dns.asyncresolver.Resolver, domain: str) -> str:
    """A `v=DMARC1` TXT record at `_dmarc.<domain>`."""
    name = f"_dmarc.{domain}"
    found = [t for t in await lookup(resolver, name, "TXT") if t.startswith("v=DMARC1")]
    if not found:
        raise RecordProblem(f"{name} TXT: no v=DMARC1 record")
    return f"{domain}: {found[0]}"
