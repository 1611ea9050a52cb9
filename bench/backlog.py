"""The benchmark's backlog: n events written through the running checkout's `track_events`.

bench.py imports `fill`. compare.py runs this file with another checkout's interpreter,

    <checkout>/.venv/bin/python bench/backlog.py DATABASE_URL N

so that each version writes its rows with its own code, whatever its schema: the file
imports nothing but that checkout's `worker` package (this folder is not a package).
"""

from __future__ import annotations

import sys

from worker import db, track_events

BAD_EVENT = "refused_event"


def fill(url: str, n: int, contacts: int | None = None, bad: frozenset[int] = frozenset()) -> None:
    """n events in one transaction, one contact each unless `contacts` is given; those
    numbered in `bad` named BAD_EVENT, which the sink refuses."""
    engine = db.create_engine(url)
    chunk = 5000
    with engine.begin() as conn:
        for start in range(0, n, chunk):
            track_events(
                conn,
                [
                    {
                        "email": f"c{(i % contacts) if contacts else i}@example.com",
                        "event": BAD_EVENT if i in bad else "cart_updated",
                        "properties": {"FIRSTNAME": "Jane"},
                        "eventdata": {"id": f"cart:{i}", "data": {"price": "50.00"}},
                    }
                    for i in range(start, min(n, start + chunk))
                ],
            )
    engine.dispose()


if __name__ == "__main__":
    fill(sys.argv[1], int(sys.argv[2]))
