"""The console's pages (GET): overview, events, one event, dead letters, blocked contacts.

Filters come from the query string, as the command line's flags would give
them (worker.when reads the times), and become one worker.admin.EventFilter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from worker import admin_reports
from worker.admin import STATUSES, EventFilter, InvalidSelection
from worker.console import chart
from worker.console.context import Console
from worker.when import InvalidTime, parse_when

# The filter fields each list page offers, in the order the form shows them.
FILTER_FIELDS = ("event", "email", "since", "until", "status_code", "error_contains")
BAD_INPUT = (InvalidSelection, InvalidTime, ValueError)
# Counts stop here ("100,000+"), so that a page costs the same whatever the table's size.
OVERVIEW_COUNT_LIMIT = 100_000
LIST_COUNT_LIMIT = 10_000


@dataclasses.dataclass(frozen=True)
class Filters:
    """A list page's filters as typed (to refill the form) and as a selection."""

    typed: dict[str, str]
    selection: EventFilter

    def query(self, **extra: Any) -> str:
        """The page's query string with these filters (and `extra`), for links."""
        params = {k: v for k, v in {**self.typed, **extra}.items() if v not in ("", None)}
        return urlencode(params)


def read_filters(params: Mapping[str, Any], dated_by: str, fields: tuple[str, ...]) -> Filters:
    """The filters given (blank ones ignored); InvalidSelection, InvalidTime or ValueError
    name what is wrong."""
    typed = {f: str(params.get(f) or "").strip() for f in fields}
    given = {f: v for f, v in typed.items() if v}
    code = given.get("status_code")
    if code is not None and not code.isdigit():
        raise InvalidSelection(f"status code must be a whole number, such as 400, not {code!r}")
    selection = EventFilter(
        status=given.get("status"),
        event=given.get("event"),
        email=given.get("email"),
        since=parse_when(given["since"], "since") if "since" in given else None,
        until=parse_when(given["until"], "until") if "until" in given else None,
        status_code=int(code) if code is not None else None,
        error_contains=given.get("error_contains"),
        dated_by=dated_by,
    )
    return Filters(typed, selection)


def _before_id(request: Request) -> int | None:
    text = request.query_params.get("before_id", "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise InvalidSelection(f"before_id must be an event id, not {text!r}")
    return int(text)


def overview(console: Console, request: Request) -> Response:
    stats = admin_reports.stats(console.engine, count_limit=OVERVIEW_COUNT_LIMIT)
    minutes = admin_reports.throughput(console.engine)
    name = "overview_live.html" if request.query_params.get("live") else "overview.html"
    return console.render(
        request,
        name,
        stats=stats,
        chart=chart.throughput_chart(minutes),
        dead_sample=admin_reports.DEAD_BY_CODE_SAMPLE,
    )


def events(console: Console, request: Request) -> Response:
    return _list(console, request, "events.html", "created_at", ("status", *FILTER_FIELDS))


def dead_letters(console: Console, request: Request) -> Response:
    return _list(console, request, "dead_letters.html", "failed_at", FILTER_FIELDS, "dead")


def _list(
    console: Console,
    request: Request,
    template: str,
    dated_by: str,
    fields: tuple[str, ...],
    status: str | None = None,
) -> Response:
    try:
        filters = read_filters(request.query_params, dated_by, fields)
        before_id = _before_id(request)
    except BAD_INPUT as exc:
        return console.error(request, 400, str(exc))
    selection = filters.selection
    if status is not None:
        selection = dataclasses.replace(selection, status=status)
    page = console.admin.list_events(selection, console.options.page_size, before_id)
    matching = console.admin.count(selection.where(), LIST_COUNT_LIMIT)
    return console.render(
        request,
        template,
        filters=filters,
        rows=page.rows,
        matching=matching,
        count_limit=LIST_COUNT_LIMIT,
        next_page=filters.query(before_id=page.next_before_id) if page.next_before_id else None,
        statuses=STATUSES,
        notice=request.query_params.get("done", ""),
    )


def event(console: Console, request: Request) -> Response:
    event_id = request.path_params["event_id"]
    detail = console.admin.show(event_id, console.options.transport)
    if detail is None:
        return console.error(request, 404, f"no event with id {event_id}")
    body = detail.body
    if body is not None and console.options.mask_emails:
        body = body.replace(str(detail.row.email), console.email(detail.row.email))
    return console.render(
        request,
        "event.html",
        detail=detail,
        row=detail.row,
        body=body,
        around=admin_reports.neighbours(console.engine, detail.row),
        notice=request.query_params.get("done", ""),
    )


def blocked(console: Console, request: Request) -> Response:
    contacts = admin_reports.blocked_contacts(console.engine)
    return console.render(request, "blocked.html", contacts=contacts)


def login_form(console: Console, request: Request) -> Response:
    return console.render(request, "login.html", next=local_path(request.query_params.get("next")))


def local_path(path: str | None) -> str:
    """Where to go after logging in: a path on this console, never another site."""
    if not path or not path.startswith("/") or path.startswith("//"):
        return "/"
    return path
