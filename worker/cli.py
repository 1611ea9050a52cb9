"""`outbox-worker`: commands, flags, exit codes and what the operator reads.

Exit codes: 0 success, 2 bad usage or configuration (one line saying why),
1 any other failure (one line saying what to do next).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, Any, NoReturn

import sqlalchemy as sa

from worker import admin_cli, admin_reports, db, output
from worker.admin import InvalidSelection
from worker.cli_base import (
    EXIT_FAILURE,
    EXIT_USAGE,
    UsageError,
    check_transport,
    finite,
    ids_text,
    listening,
    open_store,
    positive_int,
    whole,
)
from worker.config import (
    BOUNDS,
    DEFAULT_DATABASE_URL,
    DEFAULT_ENDPOINT_URL,
    DEFAULT_V3_ENDPOINT_URL,
    DEMO_DATABASE_URL,
    DRAINED_DATABASE_WAIT,
    Settings,
    SettingsError,
    bounds_text,
    check_api_key,
    check_ma_key,
    check_number,
    env_variable,
    number_text,
)
from worker.console import command as console_command
from worker.event import MAX_BODY_BYTES, InvalidEvent
from worker.policy import RetryBudget
from worker.ratelimit import PRESETS
from worker.when import InvalidTime, duration_text, parse_duration, parse_when

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        _check_logging_flags(args)
        keyed = hasattr(args, "ma_key_file")
        keys = [
            _ma_key(args) if keyed else os.environ.get("OUTBOX_MA_KEY"),
            _api_key(args) if keyed else os.environ.get("OUTBOX_API_KEY"),
        ]
        output.configure_logging(args.log_level, args.log_format, secrets=[k for k in keys if k])
        return args.handler(args) or 0
    except BrokenPipeError:
        # The reader went away (`stats | head -1`): nothing more to say, and nobody to say it to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (
        UsageError,
        SettingsError,
        db.ConfigurationError,
        InvalidEvent,
        InvalidTime,
        InvalidSelection,
    ) as exc:
        print(f"outbox-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except db.SchemaNotCurrent as exc:
        print(f"outbox-worker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except sa.exc.OperationalError as exc:
        print(
            f"outbox-worker: cannot use the database at"
            f" {db.redact(getattr(args, 'database_url', ''))}:"
            f" {output.first_line(exc.orig)} (is it running and reachable?)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    except sa.exc.DBAPIError as exc:
        print(f"outbox-worker: database error: {output.first_line(exc.orig)}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:
        print(f"outbox-worker: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE
    except Exception as exc:
        logging.getLogger("worker").debug("unexpected error", exc_info=True)
        print(
            f"outbox-worker: unexpected error: {type(exc).__name__}: {exc}"
            " (run with --log-level DEBUG for details, and please report it)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def _check_logging_flags(args: argparse.Namespace) -> None:
    """The defaults come from the environment, which argparse's choices never check."""
    for flag, env, value, allowed in (
        ("--log-level", "OUTBOX_LOG_LEVEL", args.log_level, LOG_LEVELS),
        ("--log-format", "OUTBOX_LOG_FORMAT", args.log_format, LOG_FORMATS),
    ):
        if value not in allowed:
            raise UsageError(
                f"{flag} (env {env}) must be one of {', '.join(allowed)}, not {value!r}"
            )


# -- commands ------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    engine = db.create_engine(args.database_url)
    before, after = db.migrate(engine)
    state = "already at" if before == after else f"migrated from {before or 'empty'} to"
    print(f"{db.redact(args.database_url)}: {state} revision {after}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from worker.daemon import build_daemon
    from worker.telemetry import Telemetry, TelemetryServer
    from worker.tracing import configure_from_environment

    settings = _settings(args).check()
    # OpenTelemetry's own variables (OTEL_TRACES_EXPORTER, OTEL_SERVICE_NAME, ...).
    stop_tracing = configure_from_environment(os.environ)
    telemetry = Telemetry()
    if settings.metrics_port is not None:
        with listening(
            settings.metrics_host, settings.metrics_port, "--metrics-host", "--metrics-port"
        ):
            server = TelemetryServer(telemetry, settings.metrics_port, settings.metrics_host)
        server.start()
        logging.getLogger("worker").info(
            "metrics on http://%s:%d/metrics (health: /livez, /readyz)",
            settings.metrics_host,
            server.port,
        )
    daemon = build_daemon(settings, telemetry=telemetry)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: daemon.stop())
    logging.getLogger("worker").info(
        "delivering to %s (transport %s) from %s: concurrency %d, batch %d, lease %gs,"
        " rate limit %s",
        settings.endpoint_url,
        settings.transport,
        db.redact(settings.database_url),
        settings.concurrency,
        settings.batch_size,
        settings.lease,
        _rate_limit_text(daemon),
    )
    try:
        return daemon.run()
    finally:
        if stop_tracing:
            stop_tracing()  # export the last spans before the process ends


def cmd_enqueue(args: argparse.Namespace) -> int:
    from sqlalchemy.orm import Session

    from worker.enqueue import insert_rows_reporting_new, prepare_row

    if args.file is not None:
        if args.email or args.event:
            raise UsageError("give either --file or --email/--event, not both")
        rows = _rows_from_jsonl(args.file, args.max_body_bytes)
    else:
        if not args.email or not args.event:
            raise UsageError("give --email and --event, or --file FILE (JSON Lines, - for stdin)")
        spec = {
            "email": args.email,
            "event": args.event,
            "properties": _json_flag("--properties", args.properties),
            "eventdata": _json_flag("--eventdata", args.eventdata),
            "idempotency_key": args.idempotency_key,
            "deliver_after": parse_when(args.deliver_after, "--deliver-after")
            if args.deliver_after
            else None,
        }
        rows = [prepare_row(spec, args.max_body_bytes)]
    engine = db.create_engine(args.database_url)
    db.require_current_schema(engine)
    with Session(engine) as session, session.begin():
        ids, new = insert_rows_reporting_new(session.connection(), rows)
    # Lines whose idempotency key was there already, or came earlier in the file.
    first_seen: set[int] = set()
    kept = []
    for i in ids:
        if i not in new or i in first_seen:
            kept.append(i)
        first_seen.add(i)
    if len(ids) == 1:
        print(f"enqueued outbox id {ids[0]}" if new else f"already there: outbox id {ids[0]}")
        return 0
    line = f"enqueued {len(new)} event{'' if len(new) == 1 else 's'}"
    if new:
        line += f" (outbox ids {min(new)}..{max(new)})"
    if kept:
        line += f"; {len(kept)} already there by idempotency key (outbox ids {ids_text(sorted(set(kept)))})"
    print(line)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    check_number("--interval", args.interval)
    engine = open_store(args).engine
    try:
        while True:
            stats = admin_reports.stats(engine)
            if args.json:
                print(json.dumps(stats.as_dict(), sort_keys=True), flush=True)
            else:
                output.print_stats(stats, clear=args.watch)
            if not args.watch:
                return 0
            time.sleep(args.interval)
    except KeyboardInterrupt:  # how one leaves --watch
        return 0


def cmd_sink(args: argparse.Namespace) -> int:
    from worker.sink import Sink

    check_transport(args.transport)
    v3 = args.transport != "tracker"
    key = _api_key(args) if v3 else _ma_key(args)
    if not key:
        where = "OUTBOX_API_KEY or --api-key-file" if v3 else "OUTBOX_MA_KEY or --ma-key-file"
        raise UsageError(f"the sink needs the key it accepts: set {where}")
    (check_api_key if v3 else check_ma_key)(key)  # the key the daemon will send: the same rules
    check_number("--port", args.port)
    record = open(args.record, "a", encoding="utf-8") if args.record else None  # noqa: SIM115
    with listening(args.host, args.port, "--host", "--port"):
        sink = Sink(
            key,
            args.host,
            args.port,
            args.refuse_event or (),
            record,
            transport=args.transport,
            rate_limit=args.rate_limit,
        )
    print(f"sink listening on {sink.url}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        sink.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        sink.server.server_close()
        if record:
            record.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo

    check_transport(args.transport)
    return run_demo(args.database_url, args.transport)


# -- helpers -------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(
        database_url=args.database_url,
        endpoint_url=args.endpoint_url or "",
        ma_key=_ma_key(args),
        transport=args.transport,
        api_key=_api_key(args),
        batch_max_events=args.batch_max_events,
        batch_max_bytes=args.batch_max_bytes,
        batch_shape=args.batch_shape,
        batch_request_cost=args.batch_request_cost,
        budget=RetryBudget(
            max_attempts=args.max_attempts,
            max_age=args.max_age,
            backoff_base=args.backoff_base,
            backoff_max=args.backoff_max,
        ),
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
        lease=args.lease,
        rate_limit=args.rate_limit,  # text: Settings reads it
        timeout=args.timeout,
        shutdown_timeout=args.shutdown_timeout,
        max_body_bytes=args.max_body_bytes,
        exit_when_drained=args.exit_when_drained,
        database_wait=args.database_wait,
        contact_order=not args.unordered,
        retain_delivered=args.retain_delivered,
        allow_insecure_endpoint=args.allow_insecure_endpoint,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )


def _ma_key(args: argparse.Namespace) -> str:
    """The key from --ma-key-file, else OUTBOX_MA_KEY: never from a flag `ps` would show."""
    return _key(args.ma_key_file, "--ma-key-file", "OUTBOX_MA_KEY")


def _api_key(args: argparse.Namespace) -> str:
    """The v3 key from --api-key-file, else OUTBOX_API_KEY, by the ma-key's rules."""
    return _key(getattr(args, "api_key_file", None), "--api-key-file", "OUTBOX_API_KEY")


def _key(path: str | None, flag: str, variable: str) -> str:
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read {flag}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(
                f"{flag} is not UTF-8 text: it must hold the key alone, as plain text"
            ) from None
    return os.environ.get(variable, "").strip()


def _json_flag(flag: str, text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{flag} is not valid JSON: {exc}") from None


def _rows_from_jsonl(path: str, max_body_bytes: int) -> list[dict[str, Any]]:
    """Every line validated before anything is written: all or nothing, every bad line said."""
    stream: IO[bytes] = sys.stdin.buffer if path == "-" else _open_input(path)
    rows, bad = [], 0
    with stream:
        for number, raw in enumerate(stream, start=1):
            try:
                row = _row_from_line(raw, max_body_bytes)
            except UsageError as exc:
                bad += 1
                if bad <= MAX_BAD_LINES_SHOWN:
                    print(f"line {number}: {exc}", file=sys.stderr)
                continue
            if row is not None:
                rows.append(row)
    if bad:
        if bad > MAX_BAD_LINES_SHOWN:
            print(f"... and {bad - MAX_BAD_LINES_SHOWN} more bad lines", file=sys.stderr)
        plural = "" if bad == 1 else "s"
        raise UsageError(f"nothing was enqueued: {bad} bad line{plural} (of {bad + len(rows)})")
    if not rows:
        raise UsageError(f"{path}: no events in it")
    return rows


MAX_BAD_LINES_SHOWN = 20


def _row_from_line(raw: bytes, max_body_bytes: int) -> dict[str, Any] | None:
    """One JSON Lines record as a row to insert (None for a blank line), or UsageError."""
    from worker.enqueue import prepare_row

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError("not valid UTF-8") from None
    if not line.strip():
        return None
    try:
        # NaN and Infinity parse here and are refused by validation,
        # which names the field that holds them.
        record = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise UsageError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise UsageError("must be a JSON object")
    try:
        return prepare_row(record, max_body_bytes)
    except InvalidEvent as exc:
        raise UsageError(str(exc)) from None


def _open_input(path: str) -> IO[bytes]:
    try:
        return open(path, "rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


@dataclasses.dataclass(frozen=True)
class _FromEnvironment:
    """An option that, when its flag is not given, comes from its OUTBOX_* variable."""

    dest: str
    variable: str
    parse: Callable[[str], Any]
    default: Any


def _option(
    parser: argparse.ArgumentParser,
    flag: str,
    help: str,
    default: Any = None,
    parse: Callable[[str], Any] = str,
    *,
    switch: bool = False,
    shown: str | None = None,
) -> None:
    """Add --flag, set by env OUTBOX_FLAG when not given; its help states range, default and variable."""
    variable = env_variable(flag)
    if shown is None:
        shown = "off" if switch else _shown(default)
    stated = [f"default {shown}", f"env {variable}"]
    if flag in BOUNDS:
        stated.insert(0, bounds_text(flag))
    text = f"{help} ({'; '.join(stated)})"
    if switch:
        parser.add_argument(flag, action="store_true", default=None, help=text)
        parse, default = _switch, False
    else:
        parser.add_argument(flag, type=parse, default=None, help=text)
        if isinstance(default, str):
            default = parse(default)
    dest = flag[2:].replace("-", "_")
    known = parser.get_default("from_environment") or ()
    parser.set_defaults(from_environment=(*known, _FromEnvironment(dest, variable, parse, default)))


def _shown(default: Any) -> str:
    """A default as --help states it, spelled as the flag takes it."""
    if isinstance(default, dt.timedelta):
        return duration_text(default)
    return default if isinstance(default, str) else number_text(default)


class _Parser(argparse.ArgumentParser):
    """argparse, then each option whose flag was not given from its variable, else its default.

    Done here, not in main, so that every parse (the subcommands' too) gives a
    complete namespace, and a bad variable is refused like a bad flag.

    No abbreviations (`--ma-key-fil SECRET` would be read as --ma-key-file), and
    an unrecognized argument's values are not echoed: one may be a key.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            words = message[len(prefix) :].split()
            flags = [w.split("=", 1)[0] for w in words if w.startswith("-")]
            hidden = len(words) - len(flags) + sum("=" in w for w in words if w.startswith("-"))
            message = prefix + " ".join(flags)
            if hidden:
                message += f" (and {hidden} value{'s' if hidden > 1 else ''}, not shown)"
        super().error(message)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        for option in getattr(parsed, "from_environment", ()):
            if getattr(parsed, option.dest, None) is not None:
                continue  # the flag wins
            text = os.environ.get(option.variable, "").strip()
            try:
                value = option.parse(text) if text else option.default
            except (argparse.ArgumentTypeError, ValueError) as exc:
                self.error(f"{option.variable} {exc}")
            setattr(parsed, option.dest, value)
        return parsed, extras


def _switch(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be true or false (1 or 0), not {text!r}")


def _duration(text: str) -> dt.timedelta:
    try:
        return parse_duration(text, "the duration")
    except InvalidTime as exc:
        raise argparse.ArgumentTypeError(exc.rule) from None


def _retention(text: str) -> dt.timedelta | None:
    if text.strip().lower() in ("forever", "never", "off"):
        return None
    return _duration(text)


def _rate_limit_text(daemon: Any) -> str:
    limit = daemon.gate.limit
    if not limit:
        return "none"
    shared = getattr(daemon.gate.source, "shared", False)
    return f"{limit.describe()}, {'shared by every daemon on the database' if shared else 'this daemon'}"


class _RefuseKey(argparse.Action):
    """A key given as a flag (where every user's `ps` shows it) is refused, unshown."""

    def __init__(self, option_strings: Sequence[str], dest: str, variable: str) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS)
        self.variable = variable

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        flag = self.option_strings[0]
        parser.error(
            f"{flag}: a key is never given on the command line (ps shows it to every user):"
            f" set {self.variable} or use {flag}-file"
        )


class _Version(argparse.Action):
    """--version, looking the version up only when asked (it reads package metadata)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        print(f"outbox-worker {metadata.version('outbox-worker')}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="outbox-worker",
        description="Deliver the outbox_events table to the track-event endpoint.",
    )
    parser.add_argument("--version", action=_Version, help="print the version and exit")
    # The shared options' parsers are of the subcommands' class, as add_parser's
    # `parents` is typed; only their arguments are used.
    logged = _Parser(add_help=False)
    logged.add_argument(
        "--log-level",
        default=os.environ.get("OUTBOX_LOG_LEVEL", "INFO").upper(),
        type=str.upper,
        help=f"{', '.join(LOG_LEVELS)} (env OUTBOX_LOG_LEVEL; default INFO)",
    )
    logged.add_argument(
        "--log-format",
        default=os.environ.get("OUTBOX_LOG_FORMAT", "text"),
        help="one line per record: text, or a JSON object (env OUTBOX_LOG_FORMAT; default text)",
    )
    common = _Parser(add_help=False, parents=[logged])
    common.add_argument(
        "--database-url",
        default=os.environ.get("OUTBOX_DATABASE_URL", DEFAULT_DATABASE_URL),
        help="SQLAlchemy URL of the outbox database (env OUTBOX_DATABASE_URL; default %(default)s)",
    )
    # Every daemon setting's default is the Settings type's own.
    defaults = Settings()
    budget = defaults.budget
    # --transport: the daemon's, and whose body `events show` and the console show.
    transported = _Parser(add_help=False)
    _option(
        transported,
        "--transport",
        "tracker (trackEvent, one event a request), v3 (Brevo's v3 events API) or v3-batch"
        " (its /batch, many events a request)",
        defaults.transport,
    )
    keyed = _Parser(add_help=False, parents=[transported])
    keyed.add_argument("--ma-key", action=_RefuseKey, variable="OUTBOX_MA_KEY")
    keyed.add_argument("--api-key", action=_RefuseKey, variable="OUTBOX_API_KEY")
    _option(
        keyed,
        "--ma-key-file",
        "read the ma-key from this file; never from a flag",
        shown="none: the key itself from env OUTBOX_MA_KEY",
    )
    _option(
        keyed,
        "--api-key-file",
        "read the v3 api-key from this file (--transport v3, v3-batch); never from a flag",
        shown="none: the key itself from env OUTBOX_API_KEY",
    )
    sub = parser.add_subparsers(metavar="command")

    def command(
        name: str,
        handler: Callable[[argparse.Namespace], int],
        help: str,
        parents: tuple[_Parser, ...] = (common,),
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=list(parents))
        p.set_defaults(handler=handler)
        return p

    command("migrate", cmd_migrate, "bring the database to the newest schema")

    run = command("run", cmd_run, "the delivery daemon", parents=(common, keyed))
    _option(
        run,
        "--endpoint-url",
        "the endpoint (v3-batch posts to its /batch)",
        shown=f"{DEFAULT_ENDPOINT_URL}, or {DEFAULT_V3_ENDPOINT_URL} with --transport v3 or"
        " v3-batch",
    )
    _option(
        run,
        "--batch-max-events",
        "v3-batch: most events a request",
        defaults.batch_max_events,
        whole,
    )
    _option(
        run, "--batch-max-bytes", "v3-batch: largest request body", defaults.batch_max_bytes, whole
    )
    _option(
        run,
        "--batch-shape",
        'v3-batch body: object ({"events": [...]}, as documented) or array (a bare list)',
        defaults.batch_shape,
    )
    _option(
        run,
        "--batch-request-cost",
        "v3-batch: rate-limit slots a request takes (1: Brevo counts requests)",
        defaults.batch_request_cost,
        whole,
    )
    _option(run, "--exit-when-drained", "exit 0 once nothing is due", switch=True)
    _option(
        run,
        "--database-wait",
        "seconds to wait for a database that does not answer, then exit 1",
        parse=finite,
        shown=f"for ever; {DRAINED_DATABASE_WAIT:g} with --exit-when-drained",
    )
    _option(
        run,
        "--unordered",
        "give up per-contact order, faster, for events whose order does not matter",
        switch=True,
    )
    _option(
        run,
        "--max-attempts",
        "charged attempts before an event is dead",
        budget.max_attempts,
        whole,
    )
    _option(run, "--max-age", "give up on an event this old", budget.max_age, _duration)
    _option(run, "--backoff-base", "seconds before the first retry", budget.backoff_base, finite)
    _option(
        run, "--backoff-max", "longest wait between retries, seconds", budget.backoff_max, finite
    )
    _option(run, "--concurrency", "requests in flight at once", defaults.concurrency, whole)
    _option(run, "--batch-size", "rows claimed per statement", defaults.batch_size, whole)
    _option(
        run,
        "--poll-interval",
        "seconds between polls when no wake-up comes",
        defaults.poll_interval,
        finite,
    )
    _option(run, "--lease", "seconds a claim lasts", defaults.lease, finite)
    _option(
        run,
        "--rate-limit",
        "the account's limit, shared by every daemon on a PostgreSQL database: requests per"
        " second, windows such as 10/s,36000/h (N/s, N/min, N/h), or a preset: "
        + ", ".join(PRESETS),
        defaults.rate_limit.describe(),
    )
    _option(run, "--timeout", "seconds to wait for an answer", defaults.timeout, finite)
    _option(
        run,
        "--shutdown-timeout",
        "seconds in-flight requests get at SIGTERM",
        defaults.shutdown_timeout,
        finite,
    )
    _option(run, "--max-body-bytes", "largest request body", defaults.max_body_bytes, whole)
    _option(
        run,
        "--retain-delivered",
        "prune delivered events older than this, 'forever' keeps them",
        defaults.retain_delivered,
        _retention,
    )
    _option(
        run,
        "--metrics-port",
        "serve Prometheus /metrics and /livez, /readyz health checks on this port",
        parse=whole,
        shown="off",
    )
    _option(run, "--metrics-host", "address for --metrics-port", defaults.metrics_host)
    _option(
        run,
        "--allow-insecure-endpoint",
        "allow plain http to a host that is not loopback",
        switch=True,
    )

    enqueue = command("enqueue", cmd_enqueue, "add events from flags or a JSON Lines file")
    enqueue.add_argument("--email")
    enqueue.add_argument("--event")
    enqueue.add_argument("--properties", help="a JSON object")
    enqueue.add_argument("--eventdata", help='a JSON object: {"id": "...", "data": {...}}')
    enqueue.add_argument("--idempotency-key")
    enqueue.add_argument(
        "--deliver-after",
        help="not before: a delay (90s, 15m, 2h, 1d) or an ISO 8601 time with an offset or Z",
    )
    enqueue.add_argument("--file", help="JSON Lines, one event per line; - for stdin")
    enqueue.add_argument("--max-body-bytes", type=positive_int, default=MAX_BODY_BYTES)

    stats = command("stats", cmd_stats, "counts by status, backlog age, recent throughput")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--watch", action="store_true", help="refresh until interrupted")
    stats.add_argument(
        "--interval",
        type=finite,
        default=1.0,
        help=f"seconds between refreshes ({bounds_text('--interval')}; default 1)",
    )

    admin_cli.add_commands(sub, common, transported)
    console_command.add_command(sub, common, transported)  # Starlette is loaded only to serve

    sink = command(
        "sink", cmd_sink, "a local endpoint that behaves like the API", parents=(logged, keyed)
    )
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument(
        "--port",
        type=whole,
        default=8080,
        help=f"{bounds_text('--port')}, 0 for any free port (default 8080)",
    )
    sink.add_argument("--refuse-event", action="append", help="answer 400 to events of this name")
    sink.add_argument("--record", help="append every accepted event to this JSON Lines file")
    sink.add_argument(
        "--rate-limit",
        type=whole,
        default=0,
        help="answer 429 with x-sib-ratelimit-* headers past this many requests a second"
        " (default 0: no limit)",
    )

    # The demo never touches OUTBOX_DATABASE_URL: it makes its own file anew.
    demo = command(
        "demo", cmd_demo, "the whole flow on SQLite with the local sink", parents=(transported,)
    )
    demo.add_argument("--database-url", default=DEMO_DATABASE_URL)
    demo.add_argument("--log-level", default="INFO", type=str.upper, help="default INFO")
    demo.add_argument("--log-format", default="text", help="text or json (default text)")
    return parser
