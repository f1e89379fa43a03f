import os
import signal


def _stop_before_start(signum, _frame):
    # `python -m workers`: SIGTERM during the imports ends the process cleanly (exit 0); nothing is
    # claimed yet. `start` and then Worker.run put their own handlers in place. os._exit, not
    # sys.exit: the handler can run inside an import's weakref callback, where SystemExit is
    # printed and ignored, and the worker then started anyway and ignored the SIGTERM for good
    # (found when jobs finished before the last worker of a test had started).
    os._exit(0)


signal.signal(signal.SIGTERM, _stop_before_start)

from workers.cli import app  # noqa: E402

app(prog_name="workers")
