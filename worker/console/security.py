"""Who may use the console, and proof that a POST came from one of its own pages.

- With a token (OUTBOX_CONSOLE_TOKEN or --token-file), every request must show
  it: `Authorization: Bearer TOKEN`, basic auth with TOKEN as the password, or
  the session cookie the login form sets, which holds an HMAC of the token,
  never the token itself.
- Without one (only on a loopback address), the Host header must name a
  loopback host, so that a web page whose name resolves to 127.0.0.1 (DNS
  rebinding) cannot read the console.
- Every POST carries `csrf_token`: an HMAC, under a secret of this process, of a
  random value in a SameSite=Strict cookie. Another site can neither read it
  nor make the browser send the cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from typing import Any

from starlette.requests import Request

from worker.config import _is_loopback

SESSION_COOKIE = "outbox_console_session"
CSRF_COOKIE = "outbox_console_csrf"


class Guard:
    def __init__(self, token: str | None) -> None:
        self._token = token or None
        self._secret = secrets.token_bytes(32)  # new at each start: old forms expire

    @property
    def needs_login(self) -> bool:
        return self._token is not None

    # -- authentication -------------------------------------------------------

    def session_value(self) -> str:
        assert self._token is not None
        return hmac.new(self._token.encode(), b"outbox-console-session", hashlib.sha256).hexdigest()

    def token_matches(self, given: str) -> bool:
        if self._token is None:
            return True
        return hmac.compare_digest(given.encode(), self._token.encode())

    def authenticated(self, request: Request) -> bool:
        if self._token is None:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(value.strip()):
            return True
        if scheme.lower() == "basic" and self.token_matches(_basic_password(value)):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self.session_value().encode())

    def host_allowed(self, request: Request) -> bool:
        """Without a token, only a loopback name in the Host header (DNS rebinding)."""
        if self._token is not None:
            return True
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        return _is_loopback(name)

    # -- CSRF -----------------------------------------------------------------

    def csrf_nonce(self, request: Request) -> tuple[str, bool]:
        """The browser's CSRF cookie value, and whether it is new (to be set)."""
        nonce = request.cookies.get(CSRF_COOKIE, "")
        if len(nonce) == 32:
            return nonce, False
        return secrets.token_hex(16), True

    def csrf_token(self, nonce: str) -> str:
        return hmac.new(self._secret, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_valid(self, request: Request, form: Any) -> bool:
        nonce = request.cookies.get(CSRF_COOKIE, "")
        given = form.get("csrf_token") or ""
        if not nonce or not isinstance(given, str):
            return False
        return hmac.compare_digest(given.encode(), self.csrf_token(nonce).encode())


def _basic_password(value: str) -> str:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return ""
    return decoded.partition(":")[2]
