"""The exit codes of every cli.py command, in one place (README, "Commands"): a script can tell a
failed job from a typo, an unknown id or a database that is away without reading the text."""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # The job, or one of its variants, failed (or it was cancelled): for the commands that wait
    # for a job's outcome (submit --wait, watch, demo, run-stage).
    FAILED = 1
    BAD_INPUT = 2  # bad arguments or input, an ambiguous id prefix, a setting that cannot work
    UNKNOWN_ID = 3  # no such job, variant or task
    DATABASE = 4  # the database cannot be reached, is not migrated, or was lost for good
    TIMED_OUT = 5  # watch --timeout ran out with the job still open (nothing was changed)
    INTERRUPTED = 130  # Ctrl-C or SIGTERM (128 + SIGINT, as shells report it)


def job_outcome(state: str, failed_variants: int) -> ExitCode:
    """OK only for a job that is done with every variant done; FAILED for a failed or cancelled
    job and for a done job with a failed variant (it chose among fewer candidates)."""
    return ExitCode.OK if state == "done" and failed_variants == 0 else ExitCode.FAILED
