# The outbox worker image: `outbox-worker` is the entry point (migrate, run, sink, stats, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY worker ./worker
COPY migrations ./migrations
RUN pip install --no-cache-dir . && useradd --system --uid 10001 outbox
USER outbox

ENTRYPOINT ["outbox-worker"]
CMD ["run"]
