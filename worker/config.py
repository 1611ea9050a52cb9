"""The daemon's settings: one typed object holding every default and every range.

The defaults here are the only ones: the CLI's parser states them in --help and
fills each setting from its flag, else its variable (OUTBOX_...), else this
default, and worker.daemon.build_daemon makes the daemon from the result.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import math
from urllib.parse import urlsplit

from worker.event import MAX_BODY_BYTES
from worker.policy import RetryBudget
from worker.ratelimit import NO_LIMIT, InvalidRateLimit, RateLimit, as_rate_limit
from worker.v3event import BATCH_SHAPES, DEFAULT_TRANSPORT, TRANSPORTS

DEFAULT_DATABASE_URL = "sqlite:///outbox.db"
DEMO_DATABASE_URL = "sqlite:///outbox-demo.db"  # the demo's own file, never the default's
DEFAULT_ENDPOINT_URL = "https://in-automate.brevo.com/api/v2/trackEvent"
DEFAULT_V3_ENDPOINT_URL = "https://api.brevo.com/v3/events"  # v3-batch posts to its /batch
# Real keys are far longer; a shorter one is a typo, and redacting it would mangle log text.
MIN_KEY_LENGTH = 8
# A script or cron job running `run --exit-when-drained` gives up on a database
# that stays away this long (seconds) rather than hang; the daemon waits for ever.
DRAINED_DATABASE_WAIT = 60.0


class SettingsError(ValueError):
    """A setting that cannot work; the message says which and what to do."""


# Every number a flag sets, lowest and highest, checked in one place (Settings.check,
# check_number) and stated in --help: outside them a setting spins a core, hangs
# the process or never sends (nan and inf are outside every range).
BOUNDS: dict[str, tuple[float, float]] = {
    "--concurrency": (1, 256),  # one thread and one connection each
    "--batch-size": (1, 1000),
    "--max-attempts": (1, 1_000_000),
    "--max-body-bytes": (1, 1024 * 1024),
    "--poll-interval": (0.01, 3600),
    "--lease": (1, 86400),  # renewed every third of it: it must outlast a slow statement
    "--timeout": (0.1, 3600),
    "--shutdown-timeout": (0, 3600),
    "--backoff-base": (0.01, 86400),
    "--backoff-max": (0.01, 7 * 86400),
    "--metrics-port": (1, 65535),
    "--port": (0, 65535),  # sink; 0 picks a free one
    "--interval": (0.01, 3600),  # stats --watch
    "--database-wait": (0.1, 7 * 86400),
    "--batch-max-events": (1, 200),  # Brevo's limits: configurable down, never up
    "--batch-max-bytes": (1000, 512_000),
    "--batch-request-cost": (1, 200),
}


def bounds_text(flag: str) -> str:
    """The range of a flag as --help states it: '1 to 256'."""
    low, high = BOUNDS[flag]
    return f"{number_text(low)} to {number_text(high)}"


def env_variable(flag: str) -> str:
    """The variable that sets a run flag when it is not given: --batch-size, OUTBOX_BATCH_SIZE."""
    return "OUTBOX_" + flag.lstrip("-").upper().replace("-", "_")


def number_text(number: float) -> str:
    """A number as a person writes it: 1048576, 0.05, nan (never 1.04858e+06)."""
    return str(int(number)) if math.isfinite(number) and number == int(number) else f"{number:g}"


def check_number(flag: str, value: float, variable: str | None = None) -> None:
    """Refuse a value that is not finite or outside the flag's BOUNDS."""
    low, high = BOUNDS[flag]
    if not (math.isfinite(value) and low <= value <= high):
        named = f"{flag} (env {variable})" if variable else flag
        raise SettingsError(
            f"{named} must be a number from {bounds_text(flag)}, not {number_text(value)}"
        )


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    endpoint_url: str = ""  # empty: the transport's default
    ma_key: str = dataclasses.field(default="", repr=False)  # never shown
    transport: str = DEFAULT_TRANSPORT  # tracker, v3 or v3-batch (worker.transport)
    api_key: str = dataclasses.field(default="", repr=False)  # v3's key; never shown
    batch_max_events: int = 200
    batch_max_bytes: int = 512_000
    batch_shape: str = "object"  # {"events": [...]}, or "array"
    # Rate-limit slots a v3-batch request takes: 1, as Brevo counts requests; up to
    # the events it may carry, for an account whose limit counts events.
    batch_request_cost: int = 1
    budget: RetryBudget = dataclasses.field(default_factory=RetryBudget)
    concurrency: int = 16
    batch_size: int = 100
    poll_interval: float = 1.0  # seconds between polls when no wake-up comes
    lease: float = 60.0  # seconds a claim lasts before another daemon may take it back
    # Every daemon's requests together (on PostgreSQL; this daemon's on SQLite). A
    # number is requests per second; text is --rate-limit's syntax (worker.ratelimit).
    rate_limit: RateLimit = NO_LIMIT
    timeout: float = 10.0  # seconds to wait for an answer
    shutdown_timeout: float = 10.0
    halt_probe_interval: float = 30.0  # seconds between probes while delivery is halted
    max_body_bytes: int = MAX_BODY_BYTES
    exit_when_drained: bool = False
    # Seconds to wait for a database that does not answer before exiting 1;
    # None: for ever, or DRAINED_DATABASE_WAIT with exit_when_drained.
    database_wait: float | None = None
    contact_order: bool = True  # False: faster, for streams whose order does not matter
    retain_delivered: dt.timedelta | None = dt.timedelta(days=7)  # None: keep them all
    allow_insecure_endpoint: bool = False
    metrics_port: int | None = None  # None: no metrics server
    metrics_host: str = "0.0.0.0"

    def __post_init__(self) -> None:
        if not self.endpoint_url:
            default = (
                DEFAULT_ENDPOINT_URL if self.transport == "tracker" else DEFAULT_V3_ENDPOINT_URL
            )
            object.__setattr__(self, "endpoint_url", default)
        try:
            object.__setattr__(self, "rate_limit", as_rate_limit(self.rate_limit))
        except InvalidRateLimit as exc:
            raise SettingsError(f"--rate-limit (env OUTBOX_RATE_LIMIT): {exc}") from None

    def database_patience(self) -> float | None:
        """How long the daemon waits out a database that does not answer (None: for ever)."""
        if self.database_wait is not None:
            return self.database_wait
        return DRAINED_DATABASE_WAIT if self.exit_when_drained else None

    def check(self) -> Settings:
        """Refuse settings that cannot work, with the reason."""
        if self.transport not in TRANSPORTS:
            raise SettingsError(
                f"--transport (env OUTBOX_TRANSPORT) must be one of {', '.join(TRANSPORTS)},"
                f" not {self.transport!r}"
            )
        if self.batch_shape not in BATCH_SHAPES:
            raise SettingsError(
                f"--batch-shape (env OUTBOX_BATCH_SHAPE) must be one of"
                f" {', '.join(BATCH_SHAPES)}, not {self.batch_shape!r}"
            )
        if self.transport == "tracker":
            check_ma_key(self.ma_key)
        else:
            check_api_key(self.api_key)
        check_endpoint_url(self.endpoint_url, self.allow_insecure_endpoint)
        check_endpoint_matches(self.endpoint_url, self.transport)
        numbers = {
            "--concurrency": self.concurrency,
            "--batch-size": self.batch_size,
            "--max-body-bytes": self.max_body_bytes,
            "--poll-interval": self.poll_interval,
            "--lease": self.lease,
            "--timeout": self.timeout,
            "--shutdown-timeout": self.shutdown_timeout,
            "--max-attempts": self.budget.max_attempts,
            "--backoff-base": self.budget.backoff_base,
            "--backoff-max": self.budget.backoff_max,
            "--metrics-port": self.metrics_port,
            "--database-wait": self.database_wait,
            "--batch-max-events": self.batch_max_events,
            "--batch-max-bytes": self.batch_max_bytes,
            "--batch-request-cost": self.batch_request_cost,
        }
        for flag, value in numbers.items():
            if value is not None:
                check_number(flag, value, env_variable(flag))
        if self.budget.backoff_max < self.budget.backoff_base:
            raise SettingsError("--backoff-base must be no more than --backoff-max")
        return self


def check_ma_key(key: str) -> None:
    """A key that can be real and can be sent as an HTTP header value; the message never shows it."""
    _check_key(key, "ma-key", "OUTBOX_MA_KEY", "--ma-key-file", "the tracker's client key")


def check_api_key(key: str) -> None:
    """The v3 transport's api-key, by the ma-key's rules."""
    _check_key(key, "api-key", "OUTBOX_API_KEY", "--api-key-file", "the account's v3 API key")


def _check_key(key: str, name: str, variable: str, file_flag: str, what: str) -> None:
    if not key:
        raise SettingsError(f"no {name}: set {variable} or pass {file_flag} ({what})")
    if len(key) < MIN_KEY_LENGTH:
        raise SettingsError(
            f"the {name} is shorter than {MIN_KEY_LENGTH} characters, too short to be a real"
            f" key: check {variable} or {file_flag}"
        )
    # Header values are latin-1 on the wire and refuse line breaks; real keys are
    # printable ASCII, so anything else (a Cyrillic letter, a tab) is a paste error.
    for position, char in enumerate(key, start=1):
        if not " " <= char <= "~":
            raise SettingsError(
                f"the {name} cannot be sent as an HTTP header: its character {position} is not"
                f" printable ASCII (check {variable} or {file_flag})"
            )


def check_endpoint_url(url: str, allow_insecure: bool = False) -> None:
    """An http(s) URL with a host; plain http only to a loopback address unless allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"the endpoint URL {url!r} is not an http(s) URL with a host")
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise SettingsError(
            "the endpoint URL is plain http to a remote host, which would send the key"
            " in the clear: use https, or pass --allow-insecure-endpoint"
        )


def check_endpoint_matches(url: str, transport: str) -> None:
    """Refuse an endpoint URL that is plainly another API's: every event sent there
    would be refused (a 400 for each, dead-lettered), so it is a setup error."""
    path = urlsplit(url).path.rstrip("/")
    if transport == "tracker" and path.endswith(("/v3/events", "/v3/events/batch")):
        raise SettingsError(
            f"the endpoint URL {url!r} is the v3 events API, but --transport is tracker:"
            " pass --transport v3 or v3-batch (env OUTBOX_TRANSPORT), or the trackEvent URL"
        )
    if transport != "tracker" and path.endswith("/trackEvent"):
        raise SettingsError(
            f"the endpoint URL {url!r} is the tracker's trackEvent, but --transport is"
            f" {transport}: set OUTBOX_ENDPOINT_URL to {DEFAULT_V3_ENDPOINT_URL} (or unset it)"
        )
    if transport == "v3-batch" and path.endswith("/batch"):
        raise SettingsError(
            f"the endpoint URL {url!r} ends in /batch, which v3-batch adds itself: give the"
            " events URL (OUTBOX_ENDPOINT_URL, e.g. https://api.brevo.com/v3/events)"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
