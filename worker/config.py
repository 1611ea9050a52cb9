"""The daemon's settings: one typed object, built once (flags > environment > defaults)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import re
from urllib.parse import urlsplit

from worker.event import MAX_BODY_BYTES
from worker.policy import RetryBudget

DEFAULT_DATABASE_URL = "sqlite:///outbox.db"
DEFAULT_ENDPOINT_URL = "https://in-automate.brevo.com/api/v2/trackEvent"
# Real keys are far longer; a shorter one is a typo, and redacting it would mangle log text.
MIN_KEY_LENGTH = 8
# A script or cron job running `run --exit-when-drained` gives up on a database
# that stays away this long (seconds) rather than hang; the daemon waits for ever.
DRAINED_DATABASE_WAIT = 60.0
# The shortest claim lease (seconds): renewed every third of it, it must outlast
# a slow statement or two.
MIN_LEASE = 1.0


class SettingsError(ValueError):
    """A setting that cannot work; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Settings:
    database_url: str = DEFAULT_DATABASE_URL
    endpoint_url: str = DEFAULT_ENDPOINT_URL
    ma_key: str = dataclasses.field(default="", repr=False)  # never shown
    budget: RetryBudget = dataclasses.field(default_factory=RetryBudget)
    concurrency: int = 16
    batch_size: int = 100
    poll_interval: float = 1.0  # seconds between polls when no wake-up comes
    lease: float = 60.0  # seconds a claim lasts before another daemon may take it back
    rate_limit: float = 0.0  # requests per second across all threads; 0 is unlimited
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

    def database_patience(self) -> float | None:
        """How long the daemon waits out a database that does not answer (None: for ever)."""
        if self.database_wait is not None:
            return self.database_wait
        return DRAINED_DATABASE_WAIT if self.exit_when_drained else None

    def check(self) -> Settings:
        """Refuse settings that cannot work, with the reason."""
        if not self.ma_key:
            raise SettingsError(
                "no ma-key: set OUTBOX_MA_KEY or pass --ma-key-file (the tracker's client key)"
            )
        if len(self.ma_key) < MIN_KEY_LENGTH:
            raise SettingsError(
                f"the ma-key is shorter than {MIN_KEY_LENGTH} characters, too short to be a real"
                " key: check OUTBOX_MA_KEY or --ma-key-file"
            )
        if any(c in self.ma_key for c in "\r\n"):
            raise SettingsError("the ma-key contains a line break: check OUTBOX_MA_KEY")
        check_endpoint_url(self.endpoint_url, self.allow_insecure_endpoint)
        for name in ("concurrency", "batch_size", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1")
        for name in ("poll_interval", "lease", "timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"--{name.replace('_', '-')} must be more than 0 seconds")
        if self.rate_limit < 0:
            raise SettingsError("--rate-limit must be 0 (no limit) or more")
        if self.lease < MIN_LEASE:
            raise SettingsError(
                f"--lease ({self.lease:g}s) must be at least {MIN_LEASE:g}s: a live daemon"
                " renews its claims three times a lease"
            )
        if self.database_wait is not None and self.database_wait <= 0:
            raise SettingsError("--database-wait must be more than 0 seconds")
        if self.budget.max_attempts < 1:
            raise SettingsError("--max-attempts must be at least 1")
        if self.budget.backoff_base <= 0 or self.budget.backoff_max < self.budget.backoff_base:
            raise SettingsError("--backoff-base must be > 0 and no more than --backoff-max")
        return self


def check_endpoint_url(url: str, allow_insecure: bool = False) -> None:
    """An http(s) URL with a host; plain http only to a loopback address unless allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(f"the endpoint URL {url!r} is not an http(s) URL with a host")
    if parts.scheme == "http" and not allow_insecure and not _is_loopback(parts.hostname):
        raise SettingsError(
            "the endpoint URL is plain http to a remote host, which would send the ma-key"
            " in the clear: use https, or pass --allow-insecure-endpoint"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(text: str) -> dt.timedelta:
    """'90', '90s', '15m', '12h', '7d', '2w' (seconds when no unit is given)."""
    match = _DURATION.fullmatch(text)
    if not match:
        raise SettingsError(f"{text!r} is not a duration: use e.g. 30s, 15m, 12h or 7d")
    return dt.timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
