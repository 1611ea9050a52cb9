"""The console as a Starlette application: routes, the guard in front of them, rendering.

The pages are in worker.console.pages, the actions in worker.console.actions;
both read and write only through worker.admin and worker.admin_reports.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Awaitable, Callable
from typing import Any

import jinja2
import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from worker.admin import OutboxAdmin
from worker.console.security import CSRF_COOKIE, Guard
from worker.output import _age

# Pages anyone may open: the login form and the console's own script and style.
_OPEN_PATHS = ("/login", "/static/")


@dataclasses.dataclass(frozen=True)
class ConsoleOptions:
    token: str | None = dataclasses.field(default=None, repr=False)  # never shown
    mask_emails: bool = False
    refresh_seconds: float = 5.0  # the overview's own refresh
    page_size: int = 50


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


class _GuardMiddleware(BaseHTTPMiddleware):
    def __init__(self, app: Any, console: Console) -> None:
        super().__init__(app)
        self.console = console

    async def dispatch(
        self, request: Request, call_next: Callable[..., Awaitable[Response]]
    ) -> Response:
        guard = self.console.guard
        if not guard.host_allowed(request):
            return PlainTextResponse(
                "this console answers only to a loopback host name (127.0.0.1, localhost)"
                " unless it has a token: set OUTBOX_CONSOLE_TOKEN",
                status_code=403,
            )
        nonce, new = guard.csrf_nonce(request)
        request.state.csrf_nonce = nonce
        open_path = request.url.path.startswith(_OPEN_PATHS)
        if not open_path and not guard.authenticated(request):
            if request.method != "GET":
                response: Response = PlainTextResponse("not logged in", status_code=403)
            else:
                response = RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        else:
            response = await call_next(request)
        if new:
            response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="strict")
        return response


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _json(value: Any) -> str:
    return "-" if value is None else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _number(value: int, limit: int | None = None) -> str:
    """A count as shown: 12,345, or 100,000+ past a count's limit."""
    if limit is not None and value > limit:
        return f"{limit:,}+"
    return f"{value:,}"


def create_app(engine: sa.Engine, options: ConsoleOptions | None = None) -> Starlette:
    from worker.console import actions, pages

    console = Console(engine, options or ConsoleOptions())

    def page(handler: Callable[[Console, Request], Response]) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(handler, console, request)

        return endpoint

    def action(handler: Callable[[Console, Request, Any], Response]) -> Callable[..., Any]:
        async def endpoint(request: Request) -> Response:
            form = await request.form()
            if not console.guard.csrf_valid(request, form):
                return PlainTextResponse(
                    "the form's csrf_token is missing or stale: reload the page and try again",
                    status_code=403,
                )
            return await run_in_threadpool(handler, console, request, form)

        return endpoint

    routes = [
        Route("/", page(pages.overview)),
        Route("/events", page(pages.events)),
        Route("/events/{event_id:int}", page(pages.event)),
        Route("/dead-letters", page(pages.dead_letters)),
        Route("/contacts/blocked", page(pages.blocked)),
        Route("/login", page(pages.login_form)),
        Route("/login", action(actions.login), methods=["POST"]),
        Route("/logout", action(actions.logout), methods=["POST"]),
        Route("/dead-letters/requeue", action(actions.requeue), methods=["POST"]),
        Route("/dead-letters/purge", action(actions.purge), methods=["POST"]),
        Route("/events/cancel", action(actions.cancel), methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("worker.console", "static")]), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(_GuardMiddleware, console=console)])
    app.state.console = console
    return app
