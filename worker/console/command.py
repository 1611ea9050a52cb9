"""`outbox-worker console`: serve the operator's console (the `console` extra).

It binds 127.0.0.1 by default. On any other address it refuses to start
without a token, read from OUTBOX_CONSOLE_TOKEN or --token-file and never from
a flag whose value `ps` would show. It never reads the ma-key: the pages show
the body the daemon sends, and the key travels in a header they never see.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from worker import db, output
from worker.cli_base import UsageError, check_transport, finite, listening, whole
from worker.config import _is_loopback, check_number

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8800
MIN_TOKEN_LENGTH = 16  # a console token guards every dead letter: no short words
log = logging.getLogger("worker.console")


def add_command(
    sub: Any, common: argparse.ArgumentParser, transported: argparse.ArgumentParser
) -> None:
    """Add `console` to the top-level subparsers (`transported`: --transport, whose body is shown)."""
    help_ = "the operator's console in a browser (pip install 'outbox-worker[console]')"
    # No abbreviations: `--token SECRET` must be refused, not read as --token-file's path.
    p = sub.add_parser(
        "console", help=help_, description=help_, parents=[common, transported], allow_abbrev=False
    )
    p.set_defaults(handler=cmd_console)
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}; any other needs a token)",
    )
    p.add_argument(
        "--port",
        type=whole,
        default=DEFAULT_PORT,
        help=f"0 for any free one (default {DEFAULT_PORT})",
    )
    p.add_argument(
        "--token-file",
        help="read the console's token from this file (else env OUTBOX_CONSOLE_TOKEN);"
        " required on an address that is not loopback",
    )
    p.add_argument("--mask-emails", action="store_true", help="show j***@example.com, not emails")
    p.add_argument(
        "--refresh",
        type=finite,
        default=5.0,
        help="seconds between the overview's own refreshes (default 5)",
    )


def console_token(args: argparse.Namespace) -> str | None:
    """The token from --token-file, else OUTBOX_CONSOLE_TOKEN; None when neither is set."""
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"cannot read --token-file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise UsageError(
                "--token-file is not UTF-8 text: it must hold the token alone"
            ) from None
        if not token:
            raise UsageError("--token-file is empty: put the console's token in it")
    else:
        token = os.environ.get("OUTBOX_CONSOLE_TOKEN", "").strip()
    if token and (len(token) < MIN_TOKEN_LENGTH or not token.isprintable()):
        raise UsageError(
            f"the console token must be at least {MIN_TOKEN_LENGTH} printable characters"
            " (e.g. `openssl rand -hex 16`): check OUTBOX_CONSOLE_TOKEN or --token-file"
        )
    return token or None


def cmd_console(args: argparse.Namespace) -> int:
    token = console_token(args)
    if token is None and not _is_loopback(args.host):
        raise UsageError(
            f"--host {args.host} is not a loopback address: anyone who reaches it could requeue"
            " and purge, so set OUTBOX_CONSOLE_TOKEN or pass --token-file"
        )
    check_number("--port", args.port)
    check_number("--interval", args.refresh)  # the same bounds as stats --watch
    check_transport(args.transport)
    try:
        import uvicorn

        from worker.console.app import create_app
        from worker.console.context import ConsoleOptions
    except ImportError as exc:
        raise UsageError(
            f"the console needs its extra ({exc.name} is missing):"
            " pip install 'outbox-worker[console]'"
        ) from None
    # The token joins the secrets that never reach a log line.
    key = os.environ.get("OUTBOX_MA_KEY", "")
    output.configure_logging(args.log_level, args.log_format, [s for s in (key, token) if s])
    engine = db.create_engine(args.database_url)
    db.require_current_schema(engine)
    app = create_app(
        engine,
        ConsoleOptions(
            token=token,
            mask_emails=args.mask_emails,
            refresh_seconds=args.refresh,
            transport=args.transport,
        ),
    )
    with listening(args.host, args.port, "--host", "--port"):
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.create_server((args.host, args.port), family=family)
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if family == socket.AF_INET6 else args.host
    print(f"console on http://{shown}:{port}/ for {db.redact(args.database_url)}", flush=True)
    log.info(
        "console serving %s on %s port %d (%s)",
        db.redact(args.database_url),
        args.host,
        port,
        "token required" if token else "no token: loopback only",
    )
    config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again
    # under the handlers it found: these make that a clean exit 0, as for `run`.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    log.info("console stopped")
    return 0
