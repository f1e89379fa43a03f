"""No-op stages on the real graph for the engine benchmark: each records when it started, so the
benchmark can measure commit-to-start latency. Never registered as real stages."""
from __future__ import annotations

import time

from stages.contract import StageInput, StageOutput, StageSpec, one_at_a_time

STAGES = ("vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval",
          "iou_eval", "ad_copy_gen_kor", "instagram_feed_gen")


def noop(inp: StageInput) -> StageOutput:
    return StageOutput(result={"started_at": time.time()})


def build_registry(profile: str | None = None, device: str = "cpu") -> dict[str, StageSpec]:
    return {name: StageSpec(name=name, run_batch=one_at_a_time(noop)) for name in STAGES}
