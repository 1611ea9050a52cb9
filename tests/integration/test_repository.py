"""The suite runs from a plain clone: nothing it reads may lie outside the repository.

A user's clone has no folder beside it, so a test that opens `../something`
passes here and fails there. conftest installs an audit hook that refuses any
open of a path next to the repository; these tests prove the guard bites and
that the sample files it replaced stay in step with the demo's events. And the
suite's layout holds: every fault module stays out of the quick loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLES, OutsideRepository

DEMO_EVENTS = REPO / "worker" / "demo_events.jsonl"


def test_opening_a_file_beside_the_repository_fails_the_test(tmp_path: Path) -> None:
    beside = REPO.parent / "shared" / "events" / "invalid.jsonl"
    with pytest.raises(OutsideRepository, match="outside the repository"):
        beside.read_text(encoding="utf-8")


def test_opening_a_relative_path_that_climbs_out_fails_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO / "tests")
    with pytest.raises(OutsideRepository):
        open("../../shared/events/valid.jsonl", encoding="utf-8")  # noqa: SIM115


def test_temporary_files_and_the_repository_itself_stay_readable(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("ok", encoding="utf-8")
    assert (tmp_path / "x.txt").read_text(encoding="utf-8") == "ok"
    assert (REPO / "pyproject.toml").read_text(encoding="utf-8")


def test_no_test_module_names_a_folder_beside_the_repository() -> None:
    # The audit hook sees opens at run time; this catches a path built but not yet opened.
    offenders = [
        str(path.relative_to(REPO))
        for path in (REPO / "tests").rglob("*.py")
        if path.name != "test_repository.py"
        and any(hint in path.read_text(encoding="utf-8") for hint in ("../shared", "parents[2]"))
    ]
    assert offenders == []


def test_every_fault_module_is_slow_so_the_quick_loop_leaves_it_out() -> None:
    unmarked = [
        path.name
        for path in (REPO / "tests" / "faults").glob("test_*.py")
        if "\npytestmark = pytest.mark.slow" not in path.read_text(encoding="utf-8")
    ]
    assert unmarked == []


def test_valid_samples_are_the_demos_own_events() -> None:
    def events(path: Path) -> list[object]:
        return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]

    assert events(SAMPLES / "valid.jsonl") == events(DEMO_EVENTS)


@pytest.mark.slow  # a clone and a collection in a subprocess
@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_the_suite_collects_in_a_clone_with_nothing_beside_it(tmp_path: Path) -> None:
    # What a user gets from `git clone`: only the committed files, in a folder of its own.
    clone = tmp_path / "alone" / "outbox"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
