"""What every command module shares: exit codes, the usage error, argument
types, opening the store, and binding a server's port with a one-line error.

worker.cli, worker.admin_cli and worker.console.command import it; it imports
none of them, so the command modules form no cycle.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

from worker import db

if TYPE_CHECKING:
    from worker.store import OutboxStore

EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad usage or configuration: exit 2 with this one line."""


def check_transport(name: str) -> None:
    """Refuse a --transport that does not exist, in one line."""
    from worker.v3event import TRANSPORTS

    if name not in TRANSPORTS:
        raise UsageError(
            f"--transport (env OUTBOX_TRANSPORT) must be one of {', '.join(TRANSPORTS)},"
            f" not {name!r}"
        )


def ids_text(ids: list[int]) -> str:
    """Ids as a message lists them: the first ten, then how many more."""
    shown = ", ".join(map(str, ids[:10]))
    return shown + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")


@contextlib.contextmanager
def listening(host: str, port: int, host_flag: str, port_flag: str) -> Iterator[None]:
    """Turn a server's failure to bind into one line naming the port and the flag that sets it."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"port {port} on {host} is already in use by another program: stop it,"
                f" or choose another {port_flag}"
            ) from None
        raise UsageError(
            f"cannot listen on {host} port {port} ({exc.strerror or exc}): check {host_flag}"
            f" and {port_flag}"
        ) from None


def open_store(args: argparse.Namespace) -> OutboxStore:
    """The store of --database-url, refusing a database whose schema is not current."""
    from worker.store import OutboxStore  # not loaded by commands that never need it

    engine = db.create_engine(args.database_url)
    db.require_current_schema(engine)
    return OutboxStore(engine)


def whole(text: str) -> int:
    """argparse's int, with a message; the range is Settings.check's."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None


def finite(text: str) -> float:
    """A number of seconds or a rate: float() takes 'nan' and 'inf', which no setting can use."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value
