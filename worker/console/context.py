"""What every page and action of the console needs: the database, the guard, rendering."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

import jinja2
import sqlalchemy as sa
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from worker.admin import OutboxAdmin
from worker.console.security import Guard
from worker.output import _age
from worker.v3event import DEFAULT_TRANSPORT


@dataclasses.dataclass(frozen=True)
class ConsoleOptions:
    token: str | None = dataclasses.field(default=None, repr=False)  # never shown
    mask_emails: bool = False
    refresh_seconds: float = 5.0  # the overview's own refresh
    page_size: int = 50
    transport: str = DEFAULT_TRANSPORT  # whose body the event page shows


class Console:
    """What every page and action needs: the database, the guard, the templates."""

    def __init__(self, engine: sa.Engine, options: ConsoleOptions) -> None:
        self.engine = engine
        self.admin = OutboxAdmin(engine)
        self.options = options
        self.guard = Guard(options.token)
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("worker.console", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters.update(
            email=self.email, when=_when, age=_age, json=_json, number=_number
        )

    def email(self, address: Any) -> str:
        """An address as the page shows it: masked with --mask-emails."""
        text = "" if address is None else str(address)
        if not self.options.mask_emails:
            return text
        local, at, domain = text.rpartition("@")
        if not at:
            return "***"
        return f"{local[:1]}***@{domain}"

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        nonce = request.state.csrf_nonce
        html = self.templates.get_template(name).render(
            request=request,
            csrf_token=self.guard.csrf_token(nonce),
            logged_in=self.guard.needs_login,
            options=self.options,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def error(self, request: Request, status: int, message: str) -> Response:
        return self.render(request, "error.html", status=status, message=message)


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _json(value: Any) -> str:
    return "-" if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _number(value: int, limit: int | None = None) -> str:
    """A count as shown: 12,345, or 100,000+ past a count's limit."""
    if limit is not None and value > limit:
        return f"{limit:,}+"
    return f"{value:,}"
