"""ops: what an admin runs beside the data path, never on it.

`queueadmin` (relay queue: list, show, stats) and `requeue` (retry, delete), `checkrules`
(relay check-rules), `doctor` and its DNS checks `dnscheck` (relay doctor),
`demo` with its `samples` (relay demo, on a local SES emulator).
"""
