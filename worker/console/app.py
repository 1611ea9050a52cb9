"""The console as a Starlette application: its routes and the guard in front of them.

The pages are in worker.console.pages, the actions in worker.console.actions,
what both need (the database, the guard, rendering) in worker.console.context;
they read and write only through worker.admin and worker.admin_reports.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from worker.console import actions, pages
from worker.console.context import Console, ConsoleOptions
from worker.console.security import CSRF_COOKIE

# Pages anyone may open: the login form and the console's own script and style.
_OPEN_PATHS = ("/login", "/static/")


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


def create_app(engine: sa.Engine, options: ConsoleOptions | None = None) -> Starlette:
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
