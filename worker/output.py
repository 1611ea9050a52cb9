"""What the operator reads: log lines, tables, figures. Secrets never get through."""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only the hint: the daemon imports this module and needs no report
    from worker.admin_reports import Stats, TransportFigures


class LogFormatter(logging.Formatter):
    """UTC timestamps, text or JSON lines, and the last line of defence for secrets:
    whatever reaches a record (message or traceback) has them replaced before output."""

    def __init__(self, as_json: bool = False, secrets: Iterable[str] = ()) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._as_json = as_json
        self._secrets = [s for s in secrets if s]

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        if self._as_json:
            entry = {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            trace_id = getattr(record, "trace_id", None)
            if trace_id:
                entry["trace_id"] = trace_id
            if record.exc_info:
                entry["traceback"] = self.formatException(record.exc_info)
            text = json.dumps(entry, ensure_ascii=False)
        else:
            text = super().format(record)
            # An attempt's line names the trace of the event (worker.tracing.log_fields),
            # so that logs and traces join.
            trace_id = getattr(record, "trace_id", None)
            if trace_id:
                text = f"{text} trace_id={trace_id}"
        for secret in self._secrets:
            text = text.replace(secret, "[redacted]")
        return text


def configure_logging(level: str, log_format: str = "text", secrets: Sequence[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogFormatter(as_json=log_format == "json", secrets=secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("worker").setLevel(level)


def first_line(exc: object) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def row_dict(row: Any) -> dict[str, Any]:
    return dict(row._mapping)


def json_line(value: Any) -> str:
    """One line of JSON; timestamps in ISO 8601 with `T` and their offset (UTC: +00:00)."""
    return json.dumps(value, default=_json_value, ensure_ascii=False)


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def detail_dict(detail: Any) -> dict[str, Any]:
    """`events show --json`: the row, the exact body (text) and every attempt."""
    event = {k: v for k, v in row_dict(detail.row).items() if not k.endswith("_json")}
    return {
        "event": event,
        "transport": detail.transport,
        "body": detail.body,
        "body_error": detail.body_error,
        "attempts": [row_dict(a) for a in detail.attempts],
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def print_stats(stats: Stats, clear: bool = False) -> None:
    lines = [
        *(f"{status:<22}{count:>12,}" for status, count in stats.counts.items()),
        f"{'due now':<22}{stats.due:>12,}",
        f"{'oldest pending':<22}{_age(stats.oldest_pending_age_s):>12}",
        f"{'oldest due':<22}{_age(stats.oldest_due_age_s):>12}",
        f"{'delivered last 60s':<22}{stats.delivered_last_minute:>12,}"
        f"  ({stats.delivered_last_minute / 60:.1f}/s)",
    ]
    lines.append(f"{'daemons running':<22}{len(stats.daemons):>12,}")
    for d in stats.daemons:
        if d.halted_reason:
            since = (
                f" since {d.halted_since:%Y-%m-%d %H:%M:%S} UTC ({_age(d.halted_s_ago)} ago)"
                if d.halted_since
                else ""
            )
            state = f"HALTED{since}: {d.halted_reason}"
        elif d.paused_until:
            state = f"PAUSED by the endpoint's rate limit until {d.paused_until.isoformat()}"
        else:
            state = "delivering"
        lines.append(
            f"  {d.name:<30} seen {_age(d.seen_s_ago)} ago, {d.delivered:,} delivered, {state}"
        )
    if stats.transports:
        lines += _transport_lines(stats.transports)
    if stats.rate_limit:
        lines += _shared_limit_lines(stats.rate_limit)
    if stats.dead_by_status_code:
        lines.append("dead by last status code:")
        lines += [f"  {code:<20}{n:>12,}" for code, n in stats.dead_by_status_code.items()]
    if clear:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%SZ")
        print(f"\x1b[H\x1b[2Joutbox stats at {stamp} (Ctrl-C to stop)")
    print("\n".join(lines), flush=True)


_TRANSPORT_COLUMNS = (
    "daemons",
    "requests",
    "events sent",
    "per request",
    "max batch",
    "delivered",
    "dead",
)


def _transport_lines(transports: dict[str, TransportFigures]) -> list[str]:
    lines = [
        "by transport (live daemons, since each started):",
        f"  {'transport':<12}" + "".join(f"{c:>14}" for c in _TRANSPORT_COLUMNS),
    ]
    for name, f in transports.items():
        per = "-" if f.events_per_request is None else f"{f.events_per_request:,.1f}"
        cells = (
            f"{f.daemons:,}",
            f"{f.requests:,}",
            f"{f.events_sent:,}",
            per,
            f"{f.largest_batch:,}",
            f"{f.delivered:,}",
            f"{f.dead:,}",
        )
        lines.append(f"  {name:<12}" + "".join(f"{c:>14}" for c in cells))
    return lines


def _shared_limit_lines(shared: dict[str, Any]) -> list[str]:
    grants = shared["grants"]
    per = f", {grants / shared['granted']:.2f} statements per slot" if shared["granted"] else ""
    lines = [
        f"{'rate limit (shared)':<22}{shared['rate_limit'] or '-':>12}"
        f"  ({shared['granted']:,} slots granted in {grants:,} statements{per})"
    ]
    if shared["paused_until"]:
        lines.append(
            f"  PAUSED for every daemon until {shared['paused_until']}"
            f" ({shared['pause_reason']}, answered to {shared['paused_by']})"
        )
    return lines


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], widths: Sequence[int]) -> str:
    """A plain fixed-width table; the last column takes what is left."""

    def cell(value: Any, width: int) -> str:
        text = "-" if value is None else str(value).replace("\n", " ")
        return text if len(text) <= width else text[: width - 1] + "…"

    out = ["  ".join(cell(h, w).ljust(w) for h, w in zip(headers, widths, strict=True))]
    out += [
        "  ".join(cell(v, w).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    return "\n".join(out)


def _utc(value: dt.datetime | None) -> str | None:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else None


def print_events(rows: Sequence[Any], dead: bool = False) -> None:
    """A list of events, newest first; for dead ones, when and why they failed."""
    if not rows:
        print("no dead letters" if dead else "no events")
        return
    if dead:
        dead_headers = ["id", "email", "event", "code", "tries", "failed at (UTC)", "last error"]
        dead_cells = [
            (
                r.id,
                r.email,
                r.event,
                r.last_status_code,
                r.attempts,
                _utc(r.failed_at),
                r.last_error,
            )
            for r in rows
        ]
        print(table(dead_headers, dead_cells, [8, 28, 20, 5, 5, 19, 70]))
        return
    headers = ["id", "status", "email", "event", "tries", "code", "created (UTC)", "last error"]
    cells = [
        (
            r.id,
            r.status,
            r.email,
            r.event,
            r.attempts,
            r.last_status_code,
            _utc(r.created_at),
            r.last_error,
        )
        for r in rows
    ]
    print(table(headers, cells, [8, 9, 28, 20, 5, 5, 19, 60]))


_SHOWN_FIELDS = (
    ("email", "email"),
    ("event", "event"),
    ("properties", "properties"),
    ("eventdata", "eventdata"),
    ("created_at", "created at"),
    ("attempts", "attempts"),
    ("next_attempt_at", "next attempt at"),
    ("delivered_at", "delivered at"),
    ("failed_at", "failed at"),
    ("last_status_code", "last status code"),
    ("last_error", "last error"),
    ("idempotency_key", "idempotency key"),
    ("lease_token", "claimed by"),
    ("lease_expires_at", "claim expires at"),
    ("traceparent", "traceparent"),  # W3C: 00-<trace id>-<enqueuing span id>-<flags>
)


def print_event(detail: Any) -> None:
    """`events show`: the row, the body exactly as it is sent, and every attempt."""
    row = detail.row
    lines = [f"outbox id {row.id}: {row.status}"]
    for column, label in _SHOWN_FIELDS:
        value = getattr(row, column)
        if isinstance(value, dt.datetime):
            value = value.isoformat()
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        lines.append(f"  {label:<18}{'-' if value is None else value}")
    if detail.body is not None:
        batch = ", this event's element of a batch's list" if detail.transport == "v3-batch" else ""
        lines += [f"body (--transport {detail.transport}{batch}, sent as is):", f"  {detail.body}"]
    else:
        lines.append(f"body: none, it cannot be sent ({detail.body_error})")
    if detail.attempts:
        lines.append("attempts:")
        lines.append(
            table(
                ["  #", "at (UTC)", "transport", "code", "ms", "error"],
                (
                    (
                        f"  {a.attempt}",
                        _utc(a.attempted_at),
                        a.transport,
                        a.status_code,
                        a.duration_ms,
                        a.error,
                    )
                    for a in detail.attempts
                ),
                [4, 19, 9, 5, 7, 70],
            )
        )
    else:
        lines.append("attempts: none failed")
    print("\n".join(lines))
