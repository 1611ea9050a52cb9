"""`python -m worker`: the same as `outbox-worker`."""

import sys

from worker.cli import main

sys.exit(main())
