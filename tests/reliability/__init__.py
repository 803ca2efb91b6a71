"""Reliability scenarios (DESIGN 3.4, issue 6 "Prove it"): kills, flapping, disk full, slow
clients. Each runs in seconds on small retry schedules and is part of the normal `pytest`;
all are marked `system` (real `relay serve` processes, root for the disk-full tmpfs), so
`pytest -m "not system"` leaves them out."""
