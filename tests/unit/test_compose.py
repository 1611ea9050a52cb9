"""docker-compose.yml and the Dockerfile, checked against the code they run.

There is no Docker engine on our machines (developers' or CI's), so nothing here
starts a container: these tests read the files' structure with PyYAML and run
every container command through the real CLI parser, so a renamed subcommand or
flag, a missing dependency condition or a wrong variable fails here first.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import REPO
from worker.cli import _parser
from worker.when import parse_duration

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
BUILT = sorted(name for name, service in SERVICES.items() if "build" in service)
DOCKERFILE = REPO / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def exec_form(instruction: str) -> list[str]:
    """The last such instruction's JSON array (Docker uses the last one)."""
    found = [args for name, args in dockerfile_instructions() if name == instruction]
    assert found, f"the Dockerfile has no {instruction}"
    return json.loads(found[-1])


def command_of(service: str) -> list[str]:
    command = SERVICES[service].get("command")
    return shlex.split(command) if isinstance(command, str) else list(command)


def parse_command(argv: list[str]) -> argparse.Namespace:
    """The arguments as `outbox-worker` parses them; argparse exits on anything unknown."""
    try:
        return _parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"outbox-worker rejects the arguments {argv}")


def environment(service: str) -> dict[str, str]:
    env = SERVICES[service].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def interpolated(value: str) -> str:
    """Compose's ${VAR:-default} and ${VAR-default} with none of the variables set."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def depends_on(service: str) -> dict[str, dict[str, Any]]:
    deps = SERVICES[service].get("depends_on") or {}
    return {name: {} for name in deps} if isinstance(deps, list) else deps


# -- the services ---------------------------------------------------------------


def test_compose_has_the_four_services() -> None:
    assert {"postgres", "migrate", "worker", "sink"} <= set(SERVICES)


def test_postgres_runs_the_postgres_image() -> None:
    assert SERVICES["postgres"]["image"].split(":")[0] == "postgres"


def test_postgres_has_a_healthcheck() -> None:
    assert SERVICES["postgres"]["healthcheck"]["test"]


def test_postgres_keeps_its_data_in_a_named_volume() -> None:
    volumes = [v.split(":")[0] for v in SERVICES["postgres"]["volumes"] if isinstance(v, str)]
    assert set(volumes) & set(COMPOSE.get("volumes") or {})


def test_migrate_waits_for_postgres_to_be_healthy() -> None:
    assert depends_on("migrate")["postgres"]["condition"] == "service_healthy"


def test_migrate_is_one_shot() -> None:
    assert SERVICES["migrate"].get("restart", "no") == "no"


def test_migrate_runs_the_migration() -> None:
    assert parse_command(command_of("migrate")).handler.__name__ == "cmd_migrate"


def test_worker_waits_for_the_migration_to_succeed() -> None:
    assert depends_on("worker")["migrate"]["condition"] == "service_completed_successfully"


def test_worker_runs_the_delivery_daemon() -> None:
    assert parse_command(command_of("worker")).handler.__name__ == "cmd_run"


def test_worker_environment_names_database_key_and_endpoint() -> None:
    assert {"OUTBOX_DATABASE_URL", "OUTBOX_MA_KEY", "OUTBOX_ENDPOINT_URL"} <= set(
        environment("worker")
    )


def test_worker_database_url_reaches_the_postgres_service_with_its_credentials() -> None:
    url = urlsplit(interpolated(environment("worker")["OUTBOX_DATABASE_URL"]))
    pg = environment("postgres")
    assert url.scheme.startswith("postgresql")
    assert (url.hostname, url.username, url.password, url.path.lstrip("/")) == (
        "postgres",
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )


def test_worker_default_endpoint_is_the_sink_on_the_port_it_listens_on() -> None:
    endpoint = urlsplit(interpolated(environment("worker")["OUTBOX_ENDPOINT_URL"]))
    sink = parse_command(command_of("sink"))
    assert (endpoint.hostname, endpoint.port, endpoint.path) == (
        "sink",
        sink.port,
        "/api/v2/trackEvent",
    )
    assert sink.host == "0.0.0.0"  # reachable from the other containers, not only itself


def test_sink_accepts_the_key_the_worker_sends() -> None:
    assert environment("sink")["OUTBOX_MA_KEY"] == environment("worker")["OUTBOX_MA_KEY"]


def test_worker_grace_period_outlasts_its_shutdown_timeout() -> None:
    # Compose sends SIGKILL after stop_grace_period (10 s if unset): the daemon must
    # be able to finish its in-flight requests and record them before that.
    grace = parse_duration(SERVICES["worker"].get("stop_grace_period", "10s"), "stop_grace_period")
    daemon = parse_command(command_of("worker"))
    assert grace.total_seconds() > daemon.shutdown_timeout


@pytest.mark.parametrize("service", BUILT)
def test_every_command_of_our_image_is_a_cli_subcommand(service: str) -> None:
    args = parse_command(command_of(service))
    assert getattr(args, "handler", None) is not None, f"{service}: no subcommand"


@pytest.mark.parametrize("service", BUILT)
def test_every_built_service_builds_this_directory(service: str) -> None:
    assert SERVICES[service]["build"] == "."
    assert DOCKERFILE.is_file()


# -- the image ------------------------------------------------------------------


def test_dockerfile_installs_the_package() -> None:
    runs = [args for name, args in dockerfile_instructions() if name == "RUN"]
    assert any(re.search(r"\bpip install\b[^&;]*\s\.(\s|$)", run) for run in runs)
    copied = " ".join(args for name, args in dockerfile_instructions() if name == "COPY")
    assert {"pyproject.toml", "worker", "migrations"} <= set(copied.split())


def test_dockerfile_entrypoint_is_outbox_worker() -> None:
    assert exec_form("ENTRYPOINT") == ["outbox-worker"]


def test_dockerfile_default_command_is_a_cli_subcommand() -> None:
    assert parse_command(exec_form("CMD")).handler.__name__ == "cmd_run"
