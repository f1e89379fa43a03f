"""Test stages for the engine's tests and benchmarks: fast, recording, and steered by the job's
ad copy so that each job can carry its own fault. Never registered as real stages.

Markers in the ad copy (any number, space-separated):
  PERMANENT:<stage>        the stage raises PermanentStageError (bad input)
  FLAKY:<stage>:<n>        the stage raises a retryable error on its first n attempts
  SLEEP:<stage>:<secs>     the stage sleeps first
  CRASH:<stage>            the stage kills its own process (os._exit), every attempt
  ARTIFACTS                every stage reads all earlier artifacts and writes one of its own
"""
from __future__ import annotations

import os
import time

from stages.contract import PermanentStageError, StageInput, StageOutput, StageSpec, one_at_a_time

STAGES = ("vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval",
          "iou_eval", "ad_copy_gen_kor", "instagram_feed_gen")


def markers(copy: str, stage: str) -> dict[str, str]:
    found = {}
    for word in copy.split():
        parts = word.split(":")
        if len(parts) >= 2 and parts[1] == stage:
            found[parts[0]] = parts[2] if len(parts) > 2 else ""
    return found


def make_stage(stage: str):
    def run(inp: StageInput) -> StageOutput:
        marks = markers(inp.ad_copy, stage)
        if "SLEEP" in marks:
            time.sleep(float(marks["SLEEP"]))
        if "CRASH" in marks:
            os._exit(137)
        if "PERMANENT" in marks:
            raise PermanentStageError(f"test stage {stage}: bad input planted in the copy")
        if "FLAKY" in marks and inp.attempt <= int(marks["FLAKY"]):
            raise RuntimeError(f"test stage {stage}: planted transient failure at attempt {inp.attempt}")
        result = {"stage": stage, "attempt": inp.attempt, "pid": os.getpid(), "seen": sorted(inp.results)}
        if "ARTIFACTS" in inp.ad_copy.split():
            # Read every earlier stage's artifact (on whichever worker wrote it), write our own.
            earlier = [r for r in inp.results.values()] + [
                r for v in inp.variants.values() for r in v["results"].values()]
            result["read_bytes"] = sum(len(inp.read_artifact(k)) for r in earlier
                                       for k in r.get("artifacts", {}).values())
            return StageOutput(result=result, artifacts={f"{stage}.bin": f"{stage}:{inp.attempt}".encode()})
        if inp.variant_id is None:
            result["variants"] = {vid: v["status"] for vid, v in inp.variants.items()}
        return StageOutput(result=result)

    return run


def build_registry(profile: str | None = None, device: str = "cpu") -> dict[str, StageSpec]:
    return {name: StageSpec(name=name, run_batch=one_at_a_time(make_stage(name))) for name in STAGES}
