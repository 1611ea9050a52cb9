"""The console's actions (POST): requeue, purge, cancel; log in and out.

An action without `confirm` changes nothing: it answers a page saying how
many rows it would change, with a form to confirm. The confirmation carries
the highest id counted then, so rows that arrive meanwhile are never touched.
Every change is logged with what it changed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from worker.admin import Change, EventFilter
from worker.console.context import Console
from worker.console.pages import BAD_INPUT, FILTER_FIELDS, Filters, local_path, read_filters
from worker.console.security import SESSION_COOKIE

log = logging.getLogger("worker.console")


@dataclasses.dataclass(frozen=True)
class _Kind:
    """One action: how it reads its selection, what it counts and changes, how it is said."""

    verb: str  # requeue
    done: str  # requeued
    rows: str  # dead events
    back: str  # the list page it came from
    dated_by: str
    fields: tuple[str, ...]
    where: Callable[[Console, EventFilter, bool], Any]
    change: Callable[..., Change]


def _requeue(console: Console) -> _Kind:
    return _Kind(
        "requeue", "requeued", "dead events", "/dead-letters", "failed_at", FILTER_FIELDS,
        lambda c, s, everything: c.admin.dead(s, everything), console.admin.requeue,
    )  # fmt: skip


def _purge(console: Console) -> _Kind:
    return _Kind(
        "purge", "purged", "dead events", "/dead-letters", "failed_at", FILTER_FIELDS,
        lambda c, s, everything: c.admin.dead(s, everything), console.admin.purge,
    )  # fmt: skip


def _cancel(console: Console) -> _Kind:
    return _Kind(
        "cancel", "cancelled", "pending events", "/events", "created_at",
        ("status", *FILTER_FIELDS),
        lambda c, s, everything: c.admin.cancellable(s, everything), console.admin.cancel,
    )  # fmt: skip


def requeue(console: Console, request: Request, form: Any) -> Response:
    return _act(console, request, form, _requeue(console))


def purge(console: Console, request: Request, form: Any) -> Response:
    return _act(console, request, form, _purge(console))


def cancel(console: Console, request: Request, form: Any) -> Response:
    return _act(console, request, form, _cancel(console))


def _act(console: Console, request: Request, form: Any, kind: _Kind) -> Response:
    try:
        filters = read_filters(form, kind.dated_by, kind.fields)
        ids = tuple(_id(v) for v in form.getlist("ids") if str(v).strip())
        up_to_id = _id(form["up_to_id"]) if form.get("up_to_id") else None
    except BAD_INPUT as exc:
        return console.error(request, 400, str(exc))
    scope = form.get("scope") or ("selected" if ids else "matching")
    if scope == "matching":
        ids = ()  # the button for everything matching, whatever boxes are ticked
    elif not ids:  # never fall back to the filters: that would touch far more than meant
        return console.error(
            request, 400, f"select the rows to {kind.verb} first, or use the 'all matching' button"
        )
    # Ids chosen on the page win over the filters that listed them.
    selection = EventFilter(ids=ids) if ids else filters.selection
    everything = selection.is_empty  # no filter: every dead (or pending) event, counted first
    if form.get("confirm") != "yes":
        chosen = console.admin.select(kind.where(console, selection, everything))
        return console.render(
            request,
            "confirm.html",
            kind=kind,
            chosen=chosen,
            ids=ids,
            scope=scope,
            filters=filters,
            up_to_id=chosen.max_id,
        )
    change = kind.change(selection, everything=everything, up_to_id=up_to_id)
    said = _said(change, kind)
    log.info(
        "console: %s (selection: %s; up to id %s; from %s)",
        said,
        _describe(ids, filters),
        up_to_id,
        _client(request),
    )
    # Back to the list it came from, as it was filtered, saying what was done.
    return RedirectResponse(f"{kind.back}?{filters.query(done=said)}", status_code=303)


def _said(change: Change, kind: _Kind) -> str:
    line = f"{kind.done} {change.count} {kind.rows}"
    if change.ids:
        shown = ", ".join(map(str, change.ids[:20]))
        more = len(change.ids) - 20
        line += f": ids {shown}" + (f" and {more} more" if more > 0 else "")
    if change.missed:
        line += f"; {len(change.missed)} not {kind.done}: " + "; ".join(
            f"id {i} {why}" for i, why in list(change.missed.items())[:5]
        )
    if change.skipped_in_flight:
        line += f"; {change.skipped_in_flight} in flight, not {kind.done}"
    return line


def _describe(ids: tuple[int, ...], filters: Filters) -> str:
    if ids:
        return "ids " + ", ".join(map(str, ids))
    given = {k: v for k, v in filters.typed.items() if v}
    return ", ".join(f"{k}={v!r}" for k, v in given.items()) or "everything"


def _id(value: Any) -> int:
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(f"an id must be a whole number, not {text!r}")
    return int(text)


def login(console: Console, request: Request, form: Any) -> Response:
    guard = console.guard
    target = local_path(form.get("next"))
    if not guard.needs_login:
        return RedirectResponse(target, status_code=303)
    if not guard.token_matches(str(form.get("token") or "")):
        log.warning("console: a wrong token was given at login from %s", _client(request))
        return console.render(request, "login.html", status=403, next=target, wrong=True)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(SESSION_COOKIE, guard.session_value(), httponly=True, samesite="strict")
    return response


def logout(console: Console, request: Request, form: Any) -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"
