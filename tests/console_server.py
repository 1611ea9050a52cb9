"""`outbox-worker console` as a real subprocess on 127.0.0.1, and a plain HTTP client for it.

Used by the console's command tests, its browser test and docs/screenshots.py.
The client ignores any proxy from the environment: the console is on loopback.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

_ANNOUNCED = re.compile(r"console on (http://\S+/)")


class ConsoleProcess:
    """`python -m worker console --port 0 ...`; .url once it listens; stderr in a file."""

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *flags: str,
        env: dict[str, str] | None = None,
    ) -> None:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        full_env.update(env or {})
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        command = [sys.executable, "-m", "worker", "console", "--database-url", database_url]
        self.proc = subprocess.Popen(
            [*command, "--port", "0", *flags],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.url = self._announced()

    def _announced(self) -> str:
        assert self.proc.stdout is not None
        # Its first line, printed once it listens (or nothing, if it exits: then say why).
        line = self.proc.stdout.readline()
        match = _ANNOUNCED.search(line)
        if not match:
            self.proc.kill()
            raise AssertionError(f"the console did not start: {line!r}\n{self.log()}")
        return match.group(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code


class Browserless:
    """A cookie-keeping HTTP client, as a browser without script would behave."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPCookieProcessor(self.cookies)
        )
        self.headers = headers or {}

    def get(self, path: str) -> tuple[int, str]:
        return self._open(urllib.request.Request(self.base_url + path, headers=self.headers))

    def post(self, path: str, fields: dict[str, Any]) -> tuple[int, str]:
        body = urllib.parse.urlencode(fields, doseq=True).encode()
        request = urllib.request.Request(
            self.base_url + path, data=body, headers=self.headers, method="POST"
        )
        return self._open(request)

    def csrf(self, path: str = "/dead-letters") -> str:
        _, page = self.get(path)
        return re.search(r'name="csrf_token" value="([0-9a-f]+)"', page).group(1)

    def _open(self, request: urllib.request.Request) -> tuple[int, str]:
        try:
            with self.opener.open(request, timeout=30) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
