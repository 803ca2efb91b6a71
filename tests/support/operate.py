"""Operating a running `relay serve`: changing its rules as an editor would, and reading
its metrics endpoint.

- `RULES`: a rules file template (`RULES.format(name=...)`) that sends mail whose
  subject starts with "hello" upstream under the rule `name`;
- `write_atomically(path, text)`: replace a file in one rename;
- `metrics_port(process)`: the port a `relay serve` logged for /metrics;
- `http_get(port, path)`: (status, body), 4xx/5xx included.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

from tests.support.processes import RelayProcess
from tests.support.waits import wait_until

RULES = """\
default: upstream
rules:
  - name: {name}
    route: upstream
    match:
      subject: '^hello'
"""


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one rename, as an editor or config management would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def metrics_port(process: RelayProcess) -> int:
    """The metrics port a `relay serve` process logged (`event=metrics_listening`)."""
    found = wait_until(
        lambda: re.search(r"event=metrics_listening address=\S+:(\d+)", process.log()),
        "event=metrics_listening",
    )
    return int(found.group(1))


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH -> (status, body); 4xx/5xx are answers, not errors."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
