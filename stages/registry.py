"""Every pipeline stage, in pipeline order, with the worker pool that runs it and its batch limit.

Importing this module imports no model library: the CLI lists and routes stages without paying for
torch. Stage modules are imported when a batch first runs (or when a worker warms a stage), so a
stage module that is missing or broken fails its own tasks, not the whole registry.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Sequence

from stages.contract import BatchFn, StageInput, StageOutput, StageSpec, one_at_a_time
from stages.models import check_device_name, describe_profile as _describe_profile, resolve_profile

STAGE_NAMES: tuple[str, ...] = (
    "vlm_analyze",
    "yolo_detect",
    "planner",
    "overlay",
    "vlm_judge",
    "ocr_eval",
    "readability_eval",
    "iou_eval",
    "ad_copy_gen_kor",
    "instagram_feed_gen",
)
VARIANT_STAGES = STAGE_NAMES[:8]
JOB_STAGES = STAGE_NAMES[8:]


def describe_profile(profile: str | None = None) -> str:
    """One line for a worker's startup log, plain about random weights."""
    return _describe_profile(profile)


def _batch_setting(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _module_call(module: str, function: str, **kwargs: Any) -> BatchFn:
    def run_batch(inputs: Sequence[StageInput]) -> list[StageOutput | BaseException]:
        try:
            fn = getattr(importlib.import_module(f"stages.{module}"), function)
        except Exception as exc:  # the stage's own tasks fail (and can be replayed once it is fixed)
            return [exc] * len(inputs)
        return fn(inputs, **kwargs)

    return run_batch


def _per_input(module: str, **kwargs: Any) -> BatchFn:
    def run_batch(inputs: Sequence[StageInput]) -> list[StageOutput | BaseException]:
        try:
            run = getattr(importlib.import_module(f"stages.{module}"), "run")
        except Exception as exc:
            return [exc] * len(inputs)
        return one_at_a_time(lambda inp: run(inp, **kwargs))(inputs)

    return run_batch


def _warm(module: str, profile: str, device: str) -> Callable[[], None]:
    def warm() -> None:
        importlib.import_module(f"stages.{module}").warm(profile, device)

    return warm


def build_registry(profile: str | None = None, device: str = "cpu") -> dict[str, StageSpec]:
    """The stages by name, in pipeline order. `profile` None reads MODEL_PROFILE (default real);
    `device` is where model stages run ("cpu" or "cuda"; a missing CUDA fails at warm or first use)."""
    profile = resolve_profile(profile)
    device = check_device_name(device)
    model = {"profile": profile, "device": device}
    vlm_batch = _batch_setting("VLM_BATCH", 16)
    specs = [
        StageSpec(
            "vlm_analyze",
            _module_call("vlm", "analyze_batch", **model),
            "gpu",
            vlm_batch,
            _warm("vlm", profile, device),
        ),
        StageSpec(
            "yolo_detect",
            _module_call("yolo_detect", "detect_batch", **model),
            "gpu",
            _batch_setting("YOLO_BATCH", 32),
            _warm("yolo_detect", profile, device),
        ),
        StageSpec("planner", _per_input("planner"), "cpu", warm=_warm("planner", profile, device)),
        StageSpec("overlay", _per_input("overlay"), "cpu"),
        StageSpec(
            "vlm_judge",
            _module_call("vlm", "judge_batch", **model),
            "gpu",
            vlm_batch,
            _warm("vlm", profile, device),
        ),
        StageSpec("ocr_eval", _per_input("ocr_eval"), "cpu"),
        StageSpec("readability_eval", _per_input("readability_eval"), "cpu"),
        StageSpec("iou_eval", _per_input("iou_eval"), "cpu"),
        # One translation per job (not per variant), about a second on a CPU: it runs in the CPU
        # pool, as the database's stage_graph routes it, so the GPU pool can scale to zero as
        # soon as the last vlm_judge is done.
        StageSpec(
            "ad_copy_gen_kor",
            _per_input("ad_copy_gen_kor", **model),
            "cpu",
            1,
            _warm("ad_copy_gen_kor", profile, device),
        ),
        StageSpec("instagram_feed_gen", _per_input("instagram_feed_gen"), "cpu"),
    ]
    registry = {spec.name: spec for spec in specs}
    assert tuple(registry) == STAGE_NAMES
    return registry
