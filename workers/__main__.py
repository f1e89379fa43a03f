import signal
import sys


def _stop_before_start(signum, _frame):
    # `python -m workers`: SIGTERM during the imports ends the process cleanly (exit 0); nothing is
    # claimed yet. `start` and then Worker.run put their own handlers in place.
    sys.exit(0)


signal.signal(signal.SIGTERM, _stop_before_start)

from workers.cli import app  # noqa: E402

app(prog_name="workers")
