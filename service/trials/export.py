"""Flat export of a study's trials: CSV for spreadsheets, JSON for scripts.

Columns: ``number, state, value, attempts, started_at, finished_at``, then ``param_<name>``
per searched parameter, then ``metric_<name>`` per final metric (the union over trials).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from service.trials.models import Trial

BASE_COLUMNS = ["number", "state", "value", "attempts", "started_at", "finished_at"]


def rows(trials: Iterable[Trial], param_names: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    trials = list(trials)
    params = list(param_names)
    for t in trials:
        params += [k for k in t.params if k not in params]
    metric_names = sorted({k for t in trials for k in (t.metrics or {})})
    columns = BASE_COLUMNS + [f"param_{p}" for p in params] + [f"metric_{m}" for m in metric_names]
    out = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state,
            "value": t.value,
            "attempts": t.attempts,
            "started_at": t.started_at.isoformat() if t.started_at else None,
            "finished_at": t.finished_at.isoformat() if t.finished_at else None,
        }
        row.update({f"param_{p}": t.params.get(p) for p in params})
        row.update({f"metric_{m}": (t.metrics or {}).get(m) for m in metric_names})
        out.append(row)
    return columns, out


def to_csv(columns: list[str], data: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in data:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()
