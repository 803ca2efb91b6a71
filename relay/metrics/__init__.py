"""Prometheus metrics: the objects every stage counts into, and the scrape of both processes.

`relay.metrics.http.serve_http()` exposes them on `metrics:` (loopback by default), with
/healthz and /readyz. The HTTP server runs on the event loop, so an answer from /healthz
also proves the loop is responsive.

Two processes, one scrape. In `relay serve` delivery runs in a child process
(relay.deliver.process), which counts into its own copy of these objects. The two sides
own disjoint metric families: `DELIVERY_FAMILIES` are the child's, the rest the
receiving (main) process's. On a scrape the main process renders its own
families and appends the child's text, which it asks for over a socketpair
(relay.deliver.supervisor; if the child does not answer within a second or two, its
families are simply absent from that scrape). So every family name appears
once, and counters stay plain in-memory counters: no shared files, no
multiprocess mode, and a restarted child starts its counters at zero like any
restarted exporter. With delivery in-process (tests) one registry holds all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

RECEIVED = Counter(
    "relay_received_messages", "Messages accepted (250) and committed", registry=REGISTRY
)
REJECTED = Counter(
    "relay_rejected_transactions",
    "SMTP transactions refused, by reason",
    ["reason"],
    registry=REGISTRY,
)
CLASSIFIED = Counter(
    "relay_classified_messages",
    "Messages classified, by rule and route (once a message, at its first try)",
    ["rule", "route"],
    registry=REGISTRY,
)
DELIVERIES = Counter(
    "relay_deliveries",
    "Delivery attempts by route and outcome (sent, deferred, failed)",
    ["route", "outcome"],
    registry=REGISTRY,
)
FALLBACKS = Counter(
    "relay_fallbacks",
    "SES-routed messages sent upstream instead, by reason",
    ["reason"],
    registry=REGISTRY,
)
DSNS = Counter(
    "relay_dsns",
    "Delivery status notifications queued to senders of mail that failed for good",
    registry=REGISTRY,
)
SES_LATENCY = Histogram(
    "relay_ses_request_seconds",
    "SendRawEmail latency",
    registry=REGISTRY,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
SES_THROTTLES = Counter("relay_ses_throttles", "SES Throttling replies", registry=REGISTRY)
CIRCUIT_OPEN = Gauge(
    "relay_ses_circuit_open",
    "1 while the SES circuit is open (account-wide failure)",
    registry=REGISTRY,
)
CIRCUIT_OPENINGS = Counter(
    "relay_ses_circuit_openings",
    "Times the SES circuit opened: alert on this",
    ["reason"],
    registry=REGISTRY,
)
SCOPE_CIRCUIT_OPEN = Gauge(
    "relay_ses_identity_circuit_open",
    "1 while SES-routed mail of one identity (a domain) or configuration set goes upstream",
    ["kind", "identity"],
    registry=REGISTRY,
)
SCOPE_CIRCUIT_OPENINGS = Counter(
    "relay_ses_identity_circuit_openings",
    "Times SES refused one identity or configuration set (unverified, MAIL FROM, missing "
    "set) and its circuit opened: alert on this",
    ["kind", "identity", "code"],
    registry=REGISTRY,
)
PACE = Gauge("relay_ses_pace_rate", "Current SES pace, recipients/s", registry=REGISTRY)
PACE_CEILING = Gauge(
    "relay_ses_pace_ceiling",
    "SES pace ceiling (configured or 90% of quota), recipients/s",
    registry=REGISTRY,
)
QUOTA_RATE = Gauge("relay_ses_quota_max_send_rate", "SES MaxSendRate", registry=REGISTRY)
QUOTA_24H = Gauge("relay_ses_quota_max_24h", "SES Max24HourSend", registry=REGISTRY)
SENT_24H = Gauge("relay_ses_sent_last_24h", "SES SentLast24Hours", registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "relay_queue_messages", "Messages in the spool by state", ["state"], registry=REGISTRY
)
OLDEST_AGE = Gauge(
    "relay_queue_oldest_age_seconds",
    "Age of the oldest queued or deferred message",
    registry=REGISTRY,
)
# 1 once SQLite has found the spool file damaged: one family per process, since each reads
# different pages (the spool's writer sets both; each process shows only its own family).
SPOOL_DAMAGED = Gauge(
    "relay_spool_damaged",
    "1 once the main process has found the spool file damaged (SQLITE_CORRUPT)",
    registry=REGISTRY,
)
DELIVERY_SPOOL_DAMAGED = Gauge(
    "relay_delivery_spool_damaged",
    "1 once the delivery process has found the spool file damaged (SQLITE_CORRUPT)",
    registry=REGISTRY,
)
SESSIONS_REFUSED = Counter(
    "relay_sessions_refused",
    "SMTP sessions refused or closed by a limit (421), by reason",
    ["reason"],
    registry=REGISTRY,
)
SESSIONS_OPEN = Gauge("relay_sessions_open", "SMTP sessions open now", registry=REGISTRY)
DATA_IN_MEMORY = Gauge(
    "relay_data_in_memory_bytes",
    "Bytes of unfinished DATA held in memory, all sessions (limits.max_data_in_memory)",
    registry=REGISTRY,
)
DATA_SPILLED = Counter(
    "relay_data_spilled",
    "DATA bodies moved to a temporary file because max_data_in_memory was reached",
    registry=REGISTRY,
)
DATA_NO_ROOM = Counter(
    "relay_data_no_room",
    "DATA bodies refused (452 4.3.1) because spilling them would have left the spool's file"
    " system under limits.spill_min_free",
    registry=REGISTRY,
)
AUTH_FAILURES = Counter("relay_auth_failures", "SMTP AUTH attempts that failed", registry=REGISTRY)
RULES_RELOADS = Counter(
    "relay_rules_reloads", "Rules reloads by result (ok, error)", ["result"], registry=REGISTRY
)

SUPPRESSED = Counter(
    "relay_ses_suppressed_recipients",
    "SES-routed recipients found on the SES account suppression list, by what was done"
    " (ses.suppressed: upstream, bounce)",
    ["action"],
    registry=REGISTRY,
)
SES_EVENTS = Counter(
    "relay_ses_events",
    "SES events read from the feedback queue and applied, by type (Bounce, Complaint, ...)",
    ["type"],
    registry=REGISTRY,
)
SES_EVENTS_DROPPED = Counter(
    "relay_ses_events_dropped",
    "SES feedback messages dropped, by reason (unknown_message_id, malformed, duplicate,"
    " unused_type, failed: given up after 10 receives that failed)",
    ["reason"],
    registry=REGISTRY,
)
BOUNCE_RATE = Gauge(
    "relay_ses_bounce_rate",
    "Permanent bounces / relay's SES sends over the rolling window (SES reviews at 0.05)",
    registry=REGISTRY,
)
COMPLAINT_RATE = Gauge(
    "relay_ses_complaint_rate",
    "Complaints / relay's SES sends over the rolling window (SES reviews at 0.001)",
    registry=REGISTRY,
)
# Unreadable, the queue hides every bounce: no DSN reaches Moodle, and the rates above
# stay at 0 while SES's climb (the shipped alert RelaySesFeedbackDown).
# By queue: no sample at all without `ses.events` (a 0 there fired the alert on every
# relay that reads no events).
SES_FEEDBACK_UP = Gauge(
    "relay_ses_feedback_up",
    "1 when the last ReceiveMessage on the events queue succeeded, 0 when it failed",
    ["queue"],
    registry=REGISTRY,
)
# limits.max_sessions, beside relay_sessions_open, for the shipped alert
# (contrib/prometheus/relay-alerts.yaml: RelaySessionsNearMax).
MAX_SESSIONS = Gauge(
    "relay_max_sessions", "limits.max_sessions: SMTP sessions allowed at once", registry=REGISTRY
)

DELIVERY_UP = Gauge(
    "relay_delivery_process_up",
    "1 while relay serve's delivery process runs",
    registry=REGISTRY,
)
DELIVERY_RESTARTS = Counter(
    "relay_delivery_process_restarts",
    "Times the delivery process died and was started again",
    registry=REGISTRY,
)

# Counted where delivery runs: in `relay serve`, the delivery process.
DELIVERY_FAMILIES = frozenset(
    family.name
    for metric in (
        CLASSIFIED,
        DELIVERIES,
        FALLBACKS,
        DSNS,
        SES_LATENCY,
        SES_THROTTLES,
        CIRCUIT_OPEN,
        CIRCUIT_OPENINGS,
        SCOPE_CIRCUIT_OPEN,
        SCOPE_CIRCUIT_OPENINGS,
        PACE,
        PACE_CEILING,
        QUOTA_RATE,
        QUOTA_24H,
        SENT_24H,
        RULES_RELOADS,
        SUPPRESSED,
        SES_EVENTS,
        SES_EVENTS_DROPPED,
        BOUNCE_RATE,
        COMPLAINT_RATE,
        SES_FEEDBACK_UP,
        DELIVERY_SPOOL_DAMAGED,
    )
    for family in metric.describe()
)

Scrape = Callable[[], Awaitable[bytes | None]]


class _Families(Collector):
    """REGISTRY seen through a filter on metric family names."""

    def __init__(self, keep: Callable[[str], bool]) -> None:
        self._keep = keep

    def collect(self) -> Iterable[Metric]:
        return [metric for metric in REGISTRY.collect() if self._keep(metric.name)]


async def exposition(delivery: Scrape | None = None) -> bytes:
    """The text /metrics serves.

    Without `delivery`, all this process counted (delivery in-process). With it
    (`relay serve`): this process's own families, then what `delivery()` fetched
    from the delivery process (None: no answer, its families are left out).
    """
    if delivery is None:
        return generate_latest(REGISTRY)
    own = generate_latest(_Families(lambda name: name not in DELIVERY_FAMILIES))
    return own + (await delivery() or b"")


def delivery_exposition() -> bytes:
    """The delivery process's answer to a scrape: its own families only."""
    return generate_latest(_Families(DELIVERY_FAMILIES.__contains__))
