"""Fixtures for the model-free stages: generated images with known contents and an artifact store."""

from __future__ import annotations

import io
from typing import Any, Callable

import pytest
from PIL import Image, ImageDraw

from stages import overlay, planner
from stages.contract import StageInput

SCENE_SIZE = (800, 600)
PRODUCT_BOX = (300, 200, 500, 420)  # a red "product" in the middle of the scene
BACKGROUND = (245, 245, 240)


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def yolo_result(boxes: list[tuple], size=SCENE_SIZE, product_index: int | None = 0) -> dict:
    return {
        "image_size": list(size),
        "detections": [
            {
                "box": [float(v) for v in box],
                "cls": 0,
                "label": f"object{i}",
                "confidence": 0.9,
                "is_product": i == product_index,
            }
            for i, box in enumerate(boxes)
        ],
        "product_index": product_index,
    }


def scene(product_box=PRODUCT_BOX, size=SCENE_SIZE, background=BACKGROUND) -> Image.Image:
    img = Image.new("RGB", size, background)
    x1, y1, x2, y2 = product_box
    ImageDraw.Draw(img).rectangle((x1, y1, x2 - 1, y2 - 1), fill=(200, 30, 30))  # PIL's x2 is inclusive
    return img


def make_input(stage: str, **kwargs: Any) -> StageInput:
    defaults: dict[str, Any] = dict(
        stage=stage,
        job_id="job-1",
        tenant_id="tenant-1",
        variant_id="variant-1",
        attempt=1,
        ad_copy="",
        image=None,
        results={},
    )
    defaults.update(kwargs)
    return StageInput(**defaults)


class ArtifactStore:
    """Stands in for the engine's artifact storage: keys are handed out, bytes read back by key."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def put(self, name: str, data: bytes) -> str:
        key = f"artifact/{len(self.blobs)}/{name}"
        self.blobs[key] = data
        return key

    def read(self, key: str) -> bytes:
        return self.blobs[key]

    def record(self, output) -> dict:
        """The result as the engine would store it, with "artifacts" naming the stored keys."""
        result = dict(output.result)
        if output.artifacts:
            result["artifacts"] = {name: self.put(name, data) for name, data in output.artifacts.items()}
        return result


@pytest.fixture
def store() -> ArtifactStore:
    return ArtifactStore()


@pytest.fixture
def render_pipeline(store: ArtifactStore) -> Callable[..., dict]:
    """Runs planner and overlay on an image; returns the results the evaluators receive."""

    def run(image: bytes, copy: str, yolo: dict) -> dict:
        results: dict[str, Any] = {"yolo_detect": yolo}
        plan = planner.run(make_input("planner", ad_copy=copy, image=image, results=dict(results)))
        results["planner"] = store.record(plan)
        drawn = overlay.run(make_input("overlay", ad_copy=copy, image=image, results=dict(results)))
        results["overlay"] = store.record(drawn)
        return results

    return run
