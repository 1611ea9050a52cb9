"""Regenerate the console's screenshots in docs/ (the README shows them).

    .venv/bin/python docs/screenshots.py

Runs `outbox-worker demo` in a temporary directory, serves `outbox-worker
console` on its database, and has headless Chromium (Debian's chromium and
chromium-driver, as the browser tests use) take the overview and the dead
letters filtered by status code 400.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.console_server import ConsoleProcess  # noqa: E402
from tests.integration.test_console_browser import start_chromium  # noqa: E402

SHOTS = {
    "console-overview.png": "",
    "console-dead-letters.png": "dead-letters",
    "console-event.png": "events/11",  # the event the demo's sink refuses
}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="outbox-screenshots-"))
    url = f"sqlite:///{work / 'outbox-demo.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    subprocess.run(
        [sys.executable, "-m", "worker", "demo", "--database-url", url],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    for name in [k for k in os.environ if k.lower().endswith("_proxy")]:
        del os.environ[name]  # chromedriver is on loopback
    console = ConsoleProcess(url, work / "console.log")
    driver = start_chromium()
    try:
        driver.set_window_size(1280, 900)
        for name, path in SHOTS.items():
            driver.get(console.url + path)
            driver.save_screenshot(str(ROOT / "docs" / name))
            print(f"docs/{name}: {console.url}{path}")
    finally:
        driver.quit()
        console.stop()


if __name__ == "__main__":
    main()
