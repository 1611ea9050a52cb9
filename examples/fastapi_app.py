"""A minimal FastAPI signup service on SQLAlchemy's asyncio engine: a signup and its
`signed_up` event commit together, or neither does.

    export SIGNUPS_DATABASE_URL=sqlite+aiosqlite:///signups.db   # or postgresql+psycopg://...
    .venv/bin/outbox-worker migrate --database-url sqlite:///signups.db  # the same file, sync URL
    .venv/bin/uvicorn --app-dir examples --factory fastapi_app:create_app
    curl -X POST localhost:8000/signups -H 'content-type: application/json' \
         -d '{"email": "jane@example.com", "plan": "pro"}'

`.venv/bin/outbox-worker run` (with OUTBOX_DATABASE_URL set to the same database) delivers
the event. Installed by `.venv/bin/pip install -e '.[examples]'` (see examples/README.md).
"""

# No `from __future__ import annotations`: FastAPI evaluates the endpoint's annotations
# at runtime, and `Depends(session)` names a function local to create_app.
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import String
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from worker import InvalidEvent
from worker.asyncio import track_event


class Base(DeclarativeBase):
    pass


class Signup(Base):
    __tablename__ = "signups"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(String(320), unique=True)
    plan: Mapped[str]


class SignupRequest(BaseModel):
    email: str  # checked by track_event's rules, which answer 422 with the reason
    plan: str = "free"


def create_app(database_url: str | None = None) -> FastAPI:
    """The app, on SIGNUPS_DATABASE_URL unless a URL is given; its signups table is created
    at startup, the outbox tables by `outbox-worker migrate`."""
    url = database_url or os.environ.get("SIGNUPS_DATABASE_URL", "sqlite+aiosqlite:///signups.db")
    engine = create_async_engine(url)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    async def session() -> AsyncIterator[AsyncSession]:
        async with sessions() as s:
            yield s

    app = FastAPI(lifespan=lifespan)

    @app.post("/signups", status_code=201)
    async def sign_up(
        signup: SignupRequest, s: Annotated[AsyncSession, Depends(session)]
    ) -> dict[str, Any]:
        try:
            async with s.begin():  # one transaction: commits at the end, rolls back on error
                s.add(Signup(email=signup.email, plan=signup.plan))
                # track_event does not flush the signup: its INSERT is sent at commit,
                # after the event's, and a duplicate email there rolls back both.
                outbox_id = await track_event(
                    s,
                    email=signup.email,
                    event="signed_up",
                    properties={"PLAN": signup.plan},
                    eventdata={"id": f"signup:{signup.email}", "data": {"plan": signup.plan}},
                )
        except InvalidEvent as exc:
            raise HTTPException(422, detail={"field": exc.field, "error": str(exc)}) from None
        except IntegrityError:
            raise HTTPException(409, detail=f"{signup.email} has already signed up") from None
        return {"outbox_id": outbox_id}

    return app
