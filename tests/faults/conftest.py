"""The fault suite: real worker processes against a real PostgreSQL, with faults injected.

Normal run: `.venv/bin/python -m pytest tests/faults -q`; soak: `FAULTS_SOAK=1 ...` (five times
the jobs and fault rounds; FAULTS_SCALE=N for another factor). Measurements (recovery times)
are printed at the end of the run, and appended as JSON lines to $FAULTS_REPORT when set.
"""
from __future__ import annotations

from tests.faults import harness


def pytest_terminal_summary(terminalreporter):
    if not harness.METRICS:
        return
    terminalreporter.section("fault suite measurements")
    for entry in harness.METRICS:
        values = ", ".join(f"{k}={v}" for k, v in entry.items() if k != "scenario")
        terminalreporter.write_line(f"{entry['scenario']}: {values}")
