"""One HTTP attempt, over a pooled keep-alive session, turned into an `Answer`.

Knows nothing of SQL. Everything that never changes per request (headers, the
key, proxy and CA settings from the environment) is resolved once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import html
import http.client
import json
import math
import re
import socket
import threading
import time
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from worker.policy import Answer

# What we keep of a response body in last_error and outbox_attempts.error.
MAX_ERROR_CHARS = 1000
# What we read of a response body at all: enough for any error message.
MAX_BODY_READ = 64 * 1024
# A batch answer may name an error for each of its 200 events.
MAX_BATCH_BODY_READ = 1024 * 1024
USER_AGENT = "outbox-worker/0.1"


class Deliverer:
    """Posts bodies to the endpoint; thread-safe, one connection per worker thread."""

    def __init__(
        self,
        endpoint_url: str,
        ma_key: str,
        *,
        timeout: float,  # the settings own the default (Settings.timeout)
        connect_timeout: float = 5.0,
        pool_size: int = 8,
        key_header: str = "ma-key",
        keep_content: bool = False,
    ) -> None:
        # keep_content: the answer carries its body (key redacted), for a transport
        # that reads per-event errors from it; up to a batch's worth of them.
        self._keep_content = keep_content
        self._max_read = MAX_BATCH_BODY_READ if keep_content else MAX_BODY_READ
        self._session = requests.Session()
        adapter = _OneTargetAdapter(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # Proxy and CA bundle settings from the environment, read once rather
        # than on every request; then the session stops looking.
        self._send_options: dict[str, Any] = dict(
            self._session.merge_environment_settings(endpoint_url, {}, None, None, None)
        )
        self._session.trust_env = False
        # stream: the body is read here, bounded in size (and in time, by _deadlines).
        self._send_options.update(
            timeout=(connect_timeout, timeout), allow_redirects=False, stream=True
        )
        self._timeout = timeout
        self._ma_key = ma_key
        request = requests.Request(
            "POST",
            endpoint_url,
            headers={
                key_header: ma_key,
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
        _on_the_wire.at = None
        try:
            response = self._session.send(prepared, **self._send_options)
            content = _read_body(response, self._max_read)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            failure: Exception | None = exc
        else:
            failure = None
        finally:
            cut_off = _deadlines.disarm()
        duration_ms = _ms_since(started)
        sent_at = _on_the_wire.at  # counted by the endpoint, whatever came back
        if cut_off:  # even if some of it came: it may have been cut short anywhere
            return Answer(None, _timed_out(self._timeout), duration_ms, sent_at=sent_at)
        if failure is not None:
            error = describe_network_error(failure, self._timeout)
            return Answer(None, error, duration_ms, sent_at=sent_at)
        answer = dataclasses.replace(_answer(response, content, duration_ms), sent_at=sent_at)
        if self._keep_content and content:
            key = self._ma_key.encode("latin-1", "replace")
            kept = content.replace(key, b"[redacted]") if key else content
            answer = dataclasses.replace(answer, content=kept)
        if answer.error is None:
            return answer
        return dataclasses.replace(answer, error=self.redact(answer.error))

    def redact(self, text: str) -> str:
        """Text fit for last_error: PostgreSQL refuses NUL, and an endpoint may echo the key."""
        cleaned = text.replace("\x00", "")
        if self._ma_key:
            cleaned = cleaned.replace(self._ma_key, "[redacted]")
        return cleaned

    def cut_off(self, threads: set[int]) -> None:
        """Give up on the answers these threads are waiting for (their sends return at once)."""
        _deadlines.cut_off_now(threads)

    def close(self) -> None:
        self._session.close()


def _read_body(response: requests.Response, limit: int = MAX_BODY_READ) -> bytes:
    """At most `limit` bytes of the body; the connection is kept only if that was all."""
    try:
        return bytes(response.raw.read(limit, decode_content=True))
    finally:
        response.close()  # a body read to its end has already gone back to the pool


class _Deadlines:
    """Cuts off an answer still arriving `timeout` seconds after its request went out.

    requests' read timeout bounds each socket read, not the answer: an endpoint
    sending one byte a second never trips it and holds a sender for ever. One
    thread for the whole process watches the answers being read and shuts down
    the socket of a late one; a request only notes its deadline (no thread, no
    timer of its own).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, socket.socket]] = {}  # by thread: deadline, socket
        self._cut_off: set[int] = set()  # threads whose answer was cut off
        self._wake_at = math.inf
        self._thread: threading.Thread | None = None

    def arm(self, sock: socket.socket, seconds: float) -> None:
        """The calling thread's answer on `sock` must be complete within `seconds`."""
        deadline = time.monotonic() + seconds
        with self._cond:
            self._armed[threading.get_ident()] = (deadline, sock)
            if self._thread is None or not self._thread.is_alive():  # not started, or forked
                self._thread = threading.Thread(
                    target=self._watch, name="outbox-deadlines", daemon=True
                )
                self._thread.start()
            elif deadline < self._wake_at:
                self._cond.notify()

    def disarm(self) -> bool:
        """The calling thread is done with its answer; say whether it was cut off."""
        me = threading.get_ident()
        with self._cond:
            self._armed.pop(me, None)
            if me not in self._cut_off:
                return False
            self._cut_off.discard(me)
            return True

    def cut_off_now(self, threads: set[int]) -> None:
        """End the answers these threads are reading, at once (a shutdown that will
        not wait for them)."""
        with self._cond:
            for thread in threads & self._armed.keys():
                _, sock = self._armed.pop(thread)
                self._cut_off.add(thread)
                with contextlib.suppress(OSError, TypeError):
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def _watch(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for thread, (deadline, sock) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[thread]
                        self._cut_off.add(thread)
                        # The reading thread wakes up to an end of stream.
                        with contextlib.suppress(OSError, TypeError):
                            socket.socket.shutdown(sock, socket.SHUT_RDWR)
                self._wake_at = min((d for d, _ in self._armed.values()), default=math.inf)
                self._cond.wait(None if self._wake_at == math.inf else self._wake_at - now)


_deadlines = _Deadlines()
# When the calling thread's request was last on the wire (time.monotonic()): what
# the rate limit's spacing is about, which the send gate checks against its slot.
_on_the_wire = threading.local()


class _AnswerDeadline:
    """A connection that notes when its request went out, and puts the answer it is
    about to read under `_deadlines`."""

    sock: socket.socket
    timeout: Any

    def getresponse(self) -> Any:
        # urllib3 has just sent the request and set self.timeout to the read timeout.
        _on_the_wire.at = time.monotonic()
        if isinstance(self.timeout, (int, float)):
            _deadlines.arm(self.sock, self.timeout)
        # A mixin: the connection class it is mixed into has getresponse.
        return super().getresponse()  # type: ignore[misc]


class _HTTPConnection(_AnswerDeadline, urllib3.connection.HTTPConnection):
    pass


class _HTTPSConnection(_AnswerDeadline, urllib3.connection.HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _HTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _HTTPSConnection


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _OneTargetAdapter(HTTPAdapter):
    """Every request goes to one URL with one TLS setting: work out its pool key once.

    requests recomputes it per request, with a filesystem check of the CA
    bundle path each time (when REQUESTS_CA_BUNDLE is set): 5% of the CPU.
    Its connections bound the time an answer takes (see _Deadlines).
    """

    _pool_key: Any = None

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.ProxyManager):  # not SOCKS, whose pools are its own
            manager.pool_classes_by_scheme = _POOLS
        return manager

    def build_connection_pool_key_attributes(
        self, request: Any, verify: Any, cert: Any = None
    ) -> Any:
        if self._pool_key is None:
            self._pool_key = super().build_connection_pool_key_attributes(request, verify, cert)
        return self._pool_key


def _ms_since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _answer(response: requests.Response, content: bytes, duration_ms: int) -> Answer:
    code = response.status_code
    retry_after = _seconds(response.headers.get("Retry-After"))
    reset = _seconds(response.headers.get("x-sib-ratelimit-reset"))
    exhausted = response.headers.get("x-sib-ratelimit-remaining", "").strip() == "0"
    if 200 <= code < 300:
        return Answer(code, None, duration_ms, reset if exhausted else None, exhausted)
    return Answer(
        code,
        describe_refusal(response, content),
        duration_ms,
        retry_after if retry_after is not None else reset,
        exhausted,
    )


def describe_refusal(response: requests.Response, content: bytes) -> str:
    """The endpoint's own words: "<code>: <message>" from JSON, else the text, truncated."""
    try:
        text = content.decode(response.encoding or "utf-8", errors="replace").strip()
    except LookupError:  # a charset Python does not know
        text = content.decode("utf-8", errors="replace").strip()
    if "html" in response.headers.get("content-type", "").lower():
        text = _page_text(text)  # a proxy's error page: its words, not its markup
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


def _page_text(page: str) -> str:
    page = _SCRIPTS.sub(" ", page)
    return " ".join(html.unescape(_TAGS.sub(" ", page)).split())


_SCRIPTS = re.compile(r"<(script|style)\b.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_TAGS = re.compile(r"<[^>]*>")


def describe_network_error(exc: BaseException, timeout: float) -> str:
    """One line saying what went wrong on the wire (requests' or, reading a body, urllib3's)."""
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, (requests.ReadTimeout, urllib3.exceptions.ReadTimeoutError)):
        return _timed_out(timeout)
    if isinstance(exc, (requests.exceptions.SSLError, urllib3.exceptions.SSLError)):
        return f"TLS error: {_root_cause(exc)}"[:MAX_ERROR_CHARS]
    innermost = _innermost(exc)
    if isinstance(innermost, _NOT_HTTP) and not isinstance(innermost, _HUNG_UP):
        said = str(innermost).strip()
        return f"bad response (not HTTP): {type(innermost).__name__} {said!r}"[:MAX_ERROR_CHARS]
    if isinstance(exc, (requests.ConnectionError, urllib3.exceptions.HTTPError, OSError)):
        return f"connection error: {_root_cause(exc)}"[:MAX_ERROR_CHARS]
    return f"{type(exc).__name__}: {_root_cause(exc)}"[:MAX_ERROR_CHARS]


# What http.client raises for a status line or header that is not HTTP; a hang-up
# before any answer (RemoteDisconnected) is one of them in name only.
_NOT_HTTP = (http.client.BadStatusLine, http.client.LineTooLong, http.client.UnknownProtocol)
_HUNG_UP = http.client.RemoteDisconnected


def _timed_out(timeout: float) -> str:
    # The same words whether nothing came or the answer came too slowly to finish.
    return f"no complete answer within {timeout:g}s (timeout)"


def _innermost(exc: BaseException) -> BaseException:
    # urllib3 wraps the socket error several times; the innermost says it best.
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        # The loop condition says one of the two is not None.
        seen = seen.__cause__ or seen.__context__  # type: ignore[assignment]
    return seen


def _root_cause(exc: BaseException) -> str:
    reason = getattr(exc.args[0], "reason", None) if exc.args else None
    innermost = _innermost(exc)
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        return f"cannot connect: {innermost if isinstance(innermost, OSError) else reason}"
    return str(reason or innermost or exc)


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
