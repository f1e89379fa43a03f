"""Stages for the fault suite: tests/engine_stages.py's markers, plus a record of every execution
attempt, a small random run time (so that a fault lands while stages run), and a segfault.

Every execution appends one line to $FAULTS_RECORD_DIR/<pid>.log when it starts and one when its
body returns, written straight to the file with O_APPEND (one write per line): a SIGKILL, a
crash or a database outage loses none of them, and the record needs no database.

Markers in the ad copy, besides engine_stages' PERMANENT / FLAKY / SLEEP / CRASH:
  SEGV:<stage>      the stage kills its own process with SIGSEGV, every attempt
  ARTIFACT:<stage>  the stage returns an artifact (out.bin); the engine stores it under a key
  READ_ARTIFACTS:<stage>  the stage reads every artifact its earlier results name (through the
                    engine's tenant-checked reader), as vlm_judge reads overlay's image
Environment:
  FAULTS_RECORD_DIR     where the execution records go (required)
  FAULTS_STAGE_SLEEP    "lo,hi" seconds: every execution sleeps uniform(lo, hi) first (default 0)
"""
from __future__ import annotations

import json
import os
import random
import signal
import time

from stages.contract import StageInput, StageOutput, StageSpec, one_at_a_time
from tests import engine_stages

_fd: int | None = None
_fd_pid: int | None = None


def _record(event: str, inp: StageInput) -> None:
    global _fd, _fd_pid
    if _fd is None or _fd_pid != os.getpid():
        directory = os.environ["FAULTS_RECORD_DIR"]
        _fd = os.open(os.path.join(directory, f"{os.getpid()}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fd_pid = os.getpid()
    line = json.dumps({"ev": event, "stage": inp.stage, "job": inp.job_id, "variant": inp.variant_id,
                       "attempt": inp.attempt, "pid": os.getpid(), "t": time.time()})
    os.write(_fd, (line + "\n").encode())


def _base_sleep() -> float:
    raw = os.environ.get("FAULTS_STAGE_SLEEP", "")
    if not raw:
        return 0.0
    lo, _, hi = raw.partition(",")
    return random.uniform(float(lo), float(hi or lo))


def make_stage(stage: str):
    inner = engine_stages.make_stage(stage)

    def run(inp: StageInput) -> StageOutput:
        _record("start", inp)
        pause = _base_sleep()
        if pause:
            time.sleep(pause)
        marks = engine_stages.markers(inp.ad_copy, stage)
        if "SEGV" in marks:
            os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(5)  # the signal is delivered at once; never reached
        read = {}
        if "READ_ARTIFACTS" in marks:
            for result in inp.results.values():
                for key in (result.get("artifacts") or {}).values():
                    read[key] = len(inp.read_artifact(key))
        output = inner(inp)
        if read:
            output.result["read_artifacts"] = read
        if "ARTIFACT" in marks:
            output.artifacts["out.bin"] = f"{inp.tenant_id}:{inp.variant_id}:{stage}".encode()
        _record("end", inp)
        return output

    return run


def build_registry(profile: str | None = None, device: str = "cpu") -> dict[str, StageSpec]:
    return {name: StageSpec(name=name, run_batch=one_at_a_time(make_stage(name))) for name in engine_stages.STAGES}
