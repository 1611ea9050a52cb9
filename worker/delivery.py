"""One HTTP attempt, over a pooled keep-alive session, turned into an `Answer`.

Knows nothing of SQL. Everything that never changes per request (headers, the
key, proxy and CA settings from the environment) is resolved once.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from worker.policy import Answer

# What we keep of a response body in last_error and outbox_attempts.error.
MAX_ERROR_CHARS = 1000
USER_AGENT = "outbox-worker/0.1"


class Deliverer:
    """Posts bodies to the endpoint; thread-safe, one connection per worker thread."""

    def __init__(
        self,
        endpoint_url: str,
        ma_key: str,
        *,
        timeout: float = 10.0,
        connect_timeout: float = 5.0,
        pool_size: int = 8,
    ) -> None:
        self._session = requests.Session()
        adapter = _OneTargetAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # Proxy and CA bundle settings from the environment, read once rather
        # than on every request; then the session stops looking.
        self._send_options: dict[str, Any] = self._session.merge_environment_settings(
            endpoint_url, {}, None, None, None
        )
        self._session.trust_env = False
        self._send_options.update(timeout=(connect_timeout, timeout), allow_redirects=False)
        self._timeout = timeout
        request = requests.Request(
            "POST",
            endpoint_url,
            headers={
                "ma-key": ma_key,
                "content-type": "application/json",
                "accept": "application/json",
                "user-agent": USER_AGENT,
            },
            data=b"{}",
        )
        self._template = self._session.prepare_request(request)

    def post(self, body: bytes) -> Answer:
        """Send one event body and say what came back; never raises for HTTP or network trouble."""
        prepared = self._template.copy()
        prepared.body = body
        prepared.headers["Content-Length"] = str(len(body))
        started = time.monotonic()
        try:
            response = self._session.send(prepared, **self._send_options)
        except requests.RequestException as exc:
            return Answer(None, describe_network_error(exc, self._timeout), _ms_since(started))
        return _answer(response, _ms_since(started))

    def close(self) -> None:
        self._session.close()


class _OneTargetAdapter(HTTPAdapter):
    """Every request goes to one URL with one TLS setting: work out its pool key once.

    requests recomputes it per request, with a filesystem check of the CA
    bundle path each time (when REQUESTS_CA_BUNDLE is set): 5% of the CPU.
    """

    _pool_key: Any = None

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> Any:
        if self._pool_key is None:
            self._pool_key = super().build_connection_pool_key_attributes(request, verify, cert)
        return self._pool_key


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _answer(response: requests.Response, duration_ms: int) -> Answer:
    code = response.status_code
    retry_after = _seconds(response.headers.get("Retry-After"))
    reset = _seconds(response.headers.get("x-sib-ratelimit-reset"))
    exhausted = response.headers.get("x-sib-ratelimit-remaining", "").strip() == "0"
    if 200 <= code < 300:
        return Answer(code, None, duration_ms, reset if exhausted else None, exhausted)
    return Answer(
        code,
        describe_refusal(response),
        duration_ms,
        retry_after if retry_after is not None else reset,
        exhausted,
    )


def describe_refusal(response: requests.Response) -> str:
    """The endpoint's own words: "<code>: <message>" from JSON, else the text, truncated."""
    text = response.text.strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and ("code" in parsed or "message" in parsed):
        text = f"{parsed.get('code', 'error')}: {parsed.get('message', '')}".strip()
    prefix = f"HTTP {response.status_code}"
    if 300 <= response.status_code < 400 and "location" in response.headers:
        text = f"redirect to {response.headers['location']} (not followed)"
    detail = text[:MAX_ERROR_CHARS] if text else (response.reason or "no body")
    return f"{prefix} {detail}"


def describe_network_error(exc: requests.RequestException, timeout: float) -> str:
    """One line saying what went wrong on the wire."""
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, requests.ReadTimeout):
        return f"no answer within {timeout:g}s (read timeout)"
    if isinstance(exc, requests.exceptions.SSLError):
        return f"TLS error: {_root_cause(exc)}"[:MAX_ERROR_CHARS]
    if isinstance(exc, requests.ConnectionError):
        return f"connection error: {_root_cause(exc)}"[:MAX_ERROR_CHARS]
    return f"{type(exc).__name__}: {_root_cause(exc)}"[:MAX_ERROR_CHARS]


def _root_cause(exc: BaseException) -> str:
    # urllib3 wraps the socket error several times; the innermost says it best.
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    return str(reason or seen or exc)


def _seconds(value: str | None) -> float | None:
    """A Retry-After (seconds or an HTTP date) or reset header as seconds from now."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class SendGate:
    """Spaces requests across all threads to a rate, and holds them all during a pause."""

    def __init__(self, rate_per_second: float = 0.0) -> None:
        self._interval = 1.0 / rate_per_second if rate_per_second > 0 else 0.0
        self._next = 0.0
        self._paused_until = 0.0
        self._lock = threading.Lock()

    def pause(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def paused_for(self) -> float:
        return max(0.0, self._paused_until - time.monotonic())

    def wait_turn(self) -> None:
        """Block until this thread may send: after any pause, one slot per interval."""
        while True:
            with self._lock:
                now = time.monotonic()
                reserved = now >= self._paused_until
                if reserved:
                    slot = max(now, self._next)
                    self._next = slot + self._interval
                    if slot <= now:
                        return
                else:
                    slot = self._paused_until
            time.sleep(slot - now)
            if reserved and time.monotonic() >= self._paused_until:
                return
