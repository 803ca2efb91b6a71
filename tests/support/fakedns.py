"""A tiny authoritative DNS server for tests: UDP on 127.0.0.1, port 0, from a thread.

    with FakeDns({("example.org", "TXT"): ['"v=spf1 include:amazonses.com ~all"']}) as dns:
        ...  # ask dns.address ("127.0.0.1:PORT"); anything not in the table is NXDOMAIN

Records are `{(name, type): [rdata text, ...]}` in zone-file syntax; names are
case-insensitive and may omit the final dot. `records` may be changed while it runs.
"""

from __future__ import annotations

import socket
import threading
from typing import Self

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TTL = 60


class FakeDns:
    """Answers A/TXT/CNAME/... queries from `records`; NXDOMAIN for every other name."""

    def __init__(self, records: dict[tuple[str, str], list[str]] | None = None) -> None:
        self.records = dict(records or {})
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fakedns", daemon=True)

    @property
    def address(self) -> str:
        """host:port, as `relay doctor --nameserver` takes it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def answer(self, query: dns.message.Message) -> dns.message.Message:
        """The response to `query` from the table."""
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        table = {(_fqdn(n), t.upper()): v for (n, t), v in self.records.items()}
        values = table.get((name, rdtype))
        if values:
            rrset = dns.rrset.from_text_list(question.name, TTL, dns.rdataclass.IN, rdtype, values)
            response.answer.append(rrset)
        elif not any(n == name for n, _ in table):
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response  # name exists, other type: NOERROR with no answer (NODATA)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                reply = self.answer(dns.message.from_wire(data)).to_wire()
            except Exception:  # a malformed query gets no answer, as from a real server
                continue
            self._sock.sendto(reply, peer)


def _fqdn(name: str) -> str:
    return dns.name.from_text(name).to_text().lower()
