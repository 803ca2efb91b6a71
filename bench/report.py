"""The bench's results: rows of relay-vs-Postfix numbers, a text table, a JSON file."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True, kw_only=True)
class Row:
    """One metric. `goal` is checked against `relay` with `op` (<=, >=, <)."""

    section: str
    metric: str
    unit: str
    relay: float | None = None
    postfix: float | None = None
    goal: float | None = None
    op: str = ""
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.relay is None or not self.postfix:
            return None
        return self.relay / self.postfix

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.relay is None:
            return None
        return {
            "<=": self.relay <= self.goal,
            ">=": self.relay >= self.goal,
            "<": self.relay < self.goal,
        }[self.op]


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    sections: dict[str, str] = field(default_factory=dict)  # name -> ok / skipped: / error:
    details: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def progress(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:7.1f}s] {text}", file=sys.stderr, flush=True)

    def add(self, **kwargs: Any) -> Row:
        row = Row(**kwargs)
        self.rows.append(row)
        return row

    def table(self) -> str:
        head = ("metric", "relay", "postfix", "relay/postfix", "goal", "met?")
        lines = [head]
        for row in self.rows:
            goal = f"{row.op} {_num(row.goal)} {row.unit}".strip() if row.goal is not None else ""
            met = {True: "yes", False: "NO", None: ""}[row.met]
            lines.append(
                (
                    f"{row.metric} [{row.unit}]",
                    _num(row.relay),
                    _num(row.postfix),
                    _num(row.ratio, ratio=True),
                    goal,
                    met,
                )
            )
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        out = []
        for n, line in enumerate(lines):
            out.append(" | ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
            if n == 0:
                out.append("-+-".join("-" * w for w in widths))
        notes = [f"  - {row.metric}: {row.note}" for row in self.rows if row.note]
        status = [f"  {name}: {state}" for name, state in self.sections.items()]
        return "\n".join([*out, "", "notes:", *notes, "", "sections:", *status])

    def to_json(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            item = asdict(row)
            item["ratio"] = row.ratio
            item["met"] = row.met
            rows.append(item)
        return {"meta": self.meta, "sections": self.sections, "rows": rows, "details": self.details}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, default=str) + "\n")


def _num(value: float | None, *, ratio: bool = False) -> str:
    if value is None:
        return "-"
    if ratio:
        return f"{value:.2f}x"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"
