"""The operator's commands: `events show|list|cancel`, `dead-letters list|requeue|purge`, `prune`.

Flags become one worker.admin.EventFilter; what to select and what a change
did is worker.admin's, what the operator reads is here and in worker.output.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable
from typing import Any

from worker import output
from worker.admin import STATUSES, Change, EventFilter, OutboxAdmin
from worker.cli_base import (
    EXIT_FAILURE,
    UsageError,
    check_transport,
    ids_text,
    open_store,
    positive_int,
)
from worker.event import MAX_BODY_BYTES
from worker.when import parse_when


def _filters(dated: str) -> argparse.ArgumentParser:
    """The flags that select events; --since/--until compare the column `dated`."""
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--event", help="this event name")
    filters.add_argument("--email", help="this contact (ASCII letters compared ignoring case)")
    for flag, rule in (("--since", "at or after"), ("--until", "before")):
        filters.add_argument(
            flag,
            metavar="WHEN",
            help=f"{dated} {rule} an ISO 8601 time with an offset, or a duration ago (2h, 1d)",
        )
    filters.add_argument("--status-code", type=int, help="the last answer was this HTTP status")
    filters.add_argument("--error-contains", help="last_error contains this (ignoring ASCII case)")
    return filters


def add_commands(
    sub: Any, common: argparse.ArgumentParser, transported: argparse.ArgumentParser
) -> None:
    """Add the operator's commands to the top-level subparsers (`transported`: --transport)."""
    paged = argparse.ArgumentParser(add_help=False)
    paged.add_argument("--limit", type=positive_int, default=50, help="rows a page (default 50)")
    paged.add_argument("--before-id", type=int, help="the page after one ending here (printed)")
    paged.add_argument("--json", action="store_true", help="one JSON object per line")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true", help="say what would change; change nothing")

    def command(
        parent: Any, name: str, handler: Callable[..., int], help_: str, *parents: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=help_, description=help_, parents=[common, *parents]
        )
        p.set_defaults(handler=handler)
        return p

    events = sub.add_parser("events", help="look at, find and cancel events")
    events_sub = events.add_subparsers(metavar="action")
    show = command(
        events_sub, "show", cmd_events_show, "one event: its row, body and attempts", transported
    )
    show.add_argument("id", type=int, help="outbox id")
    show.add_argument("--json", action="store_true", help="one JSON object")
    show.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES)
    listing = command(
        events_sub,
        "list",
        cmd_events_list,
        "events, newest first",
        _filters("created_at"),
        paged,
    )
    listing.add_argument("--status", choices=STATUSES)
    cancel = command(
        events_sub,
        "cancel",
        cmd_events_cancel,
        "pending events to dead, never sent ('cancelled by operator'); in-flight ones are"
        " skipped; dead-letters requeue undoes it",
        _filters("created_at"),
        dry,
    )
    cancel.add_argument("ids", type=int, nargs="*", metavar="ID", help="outbox ids")
    cancel.add_argument("--reason", help="added to last_error after 'cancelled by operator: '")

    dead = sub.add_parser("dead-letters", help="inspect and replay what failed")
    dead_sub = dead.add_subparsers(metavar="action")
    command(
        dead_sub,
        "list",
        cmd_dead_list,
        "dead events, newest first, and why they failed",
        _filters("failed_at"),
        paged,
    )
    for name, handler, help_ in (
        ("requeue", cmd_dead_requeue, "dead events back to pending, attempts 0, due now"),
        ("purge", cmd_dead_purge, "delete dead events (more than one: --yes off a terminal)"),
    ):
        p = command(dead_sub, name, handler, help_, _filters("failed_at"), dry)
        p.add_argument("--id", type=int, nargs="+", help="outbox ids")
        p.add_argument("--all", action="store_true", help="every dead event")
    p.add_argument("--yes", action="store_true", help="purge more than one without asking")

    prune = command(sub, "prune", cmd_prune, "delete delivered (and optionally dead) events", dry)
    prune.add_argument(
        "--older-than",
        default="7d",
        help="finished this long ago (default 7d), or before an ISO 8601 time with an offset",
    )
    prune.add_argument("--include-dead", action="store_true", help="dead events too")


# -- events ------------------------------------------------------------------------


def cmd_events_show(args: argparse.Namespace) -> int:
    check_transport(args.transport)
    detail = _admin(args).show(args.id, args.transport, args.max_body_bytes)
    if detail is None:
        print(f"outbox-worker: no event with id {args.id}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(output.json_line(output.detail_dict(detail)))
    else:
        output.print_event(detail)
    return 0


def cmd_events_list(args: argparse.Namespace) -> int:
    return _list(args, _filter(args, status=args.status))


def cmd_events_cancel(args: argparse.Namespace) -> int:
    selection = _filter(args, ids=args.ids)
    if selection.is_empty:
        raise UsageError("say which events: ID [ID ...] or filters (--event, --email, --since ...)")
    _refuse_ids_with_filters(selection)
    change = _admin(args).cancel(selection, dry_run=args.dry_run, reason=args.reason)
    if change.skipped_in_flight:
        print(
            f"outbox-worker: {change.skipped_in_flight} matching events are in flight (a daemon"
            " is sending them): not cancelled",
            file=sys.stderr,
        )
    return _report(args, change, "cancel", "cancelled", "pending events")


# -- dead letters --------------------------------------------------------------------


def cmd_dead_list(args: argparse.Namespace) -> int:
    return _list(args, _filter(args, status="dead", dated_by="failed_at"))


def cmd_dead_requeue(args: argparse.Namespace) -> int:
    selection = _dead_selection(args)
    change = _admin(args).requeue(selection, everything=args.all, dry_run=args.dry_run)
    return _report(args, change, "requeue", "requeued", "dead events")


def cmd_dead_purge(args: argparse.Namespace) -> int:
    selection = _dead_selection(args)
    admin = _admin(args)
    up_to_id = None
    if not args.dry_run and not args.yes:
        chosen = admin.select(admin.dead(selection, args.all))
        if chosen.count > 1 and not _confirmed(f"purge {chosen.count} dead events?"):
            print("outbox-worker: nothing was purged", file=sys.stderr)
            return EXIT_FAILURE
        up_to_id = chosen.max_id  # never more than what was confirmed
    change = admin.purge(selection, everything=args.all, dry_run=args.dry_run, up_to_id=up_to_id)
    return _report(args, change, "purge", "purged", "dead events")


def _dead_selection(args: argparse.Namespace) -> EventFilter:
    selection = _filter(args, ids=args.id or (), dated_by="failed_at")
    if selection.is_empty and not args.all:
        raise UsageError(
            "say which dead events: --id N [N ...], filters (--status-code C ...) or --all"
        )
    if args.all and not selection.is_empty:
        raise UsageError("--all is every dead event: give it without --id or filters")
    _refuse_ids_with_filters(selection)
    return selection


def _confirmed(question: str) -> bool:
    if not sys.stdin.isatty():
        raise UsageError(f"{question[:-1]}: pass --yes to confirm (stdin is not a terminal)")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


# -- prune -------------------------------------------------------------------------


def cmd_prune(args: argparse.Namespace) -> int:
    older_than = parse_when(args.older_than, "--older-than")
    kinds = "delivered and dead" if args.include_dead else "delivered"
    when = (
        f"before {older_than.isoformat()}"
        if isinstance(older_than, dt.datetime)
        else f"more than {args.older_than} ago"
    )
    if args.dry_run:
        count = _admin(args).prunable(older_than, args.include_dead).count
        print(f"would prune {count} {kinds} events finished {when} (dry run: nothing changed)")
        return 0
    count = open_store(args).prune(older_than, include_dead=args.include_dead)
    print(f"pruned {count} {kinds} events finished {when}")
    return 0


# -- shared ------------------------------------------------------------------------


def _filter(args: argparse.Namespace, **fixed: Any) -> EventFilter:
    return EventFilter(
        event=args.event,
        email=args.email,
        since=parse_when(args.since, "--since") if args.since else None,
        until=parse_when(args.until, "--until") if args.until else None,
        status_code=args.status_code,
        error_contains=args.error_contains,
        **fixed,
    )


def _refuse_ids_with_filters(selection: EventFilter) -> None:
    if selection.ids and selection.has_filters:
        raise UsageError("give ids or filters, not both")


def _list(args: argparse.Namespace, selection: EventFilter) -> int:
    page = _admin(args).list_events(selection, args.limit, args.before_id)
    if args.json:
        for row in page.rows:
            print(output.json_line(output.row_dict(row)))
    else:
        output.print_events(page.rows, dead=selection.status == "dead")
    if page.next_before_id is not None:
        print(
            f"more: the next page is the same command with --before-id {page.next_before_id}",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0


def _report(args: argparse.Namespace, change: Change, verb: str, done: str, kinds: str) -> int:
    for id_, why in change.missed.items():
        print(f"outbox-worker: id {id_} not {done}: {why}", file=sys.stderr)
    line = f"would {verb}" if args.dry_run else done
    line += f" {change.count} {kinds}"
    if change.ids:
        more = change.count - len(change.ids)  # a filter's change lists its newest few
        line += f": ids {ids_text(change.ids)}" + (f" and {more} more" if more > 0 else "")
    if args.dry_run:
        line += " (dry run: nothing changed)"
    print(line)
    # Ids were asked for and none of them could be used: the operator's intent failed.
    return EXIT_FAILURE if change.missed and not change.count else 0


def _admin(args: argparse.Namespace) -> OutboxAdmin:
    return OutboxAdmin(open_store(args).engine)
