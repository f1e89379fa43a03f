"""yolo_detect: product choice, result shape, and the random-weight YOLO11n run end to end offline."""
from __future__ import annotations

from tests.stages import model_env  # noqa: F401  (offline environment first)

import numpy as np
import pytest
import torch
from PIL import Image

from stages import yolo_detect
from stages.contract import PermanentStageError, StageOutput
from tests.stages.model_env import clean_stage_env, cuda_available, png, stage_input

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    clean_stage_env(monkeypatch)
    # Random weights score every box near zero; a tiny threshold lets detections through.
    monkeypatch.setenv("YOLO_CONF", "0.000001")
    monkeypatch.setenv("YOLO_MAX_DET", "20")


def noise_input(size, seed, variant="v1"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return stage_input("yolo_detect", variant=variant, image=png(image=Image.fromarray(pixels)))


def test_product_is_large_and_central():
    boxes = [
        [0, 0, 60, 60],        # corner, small
        [10, 10, 390, 290],    # almost the whole image, centred
        [150, 100, 250, 200],  # central, small
        [200, 0, 400, 300],    # large, off to the side
    ]
    assert yolo_detect.choose_product(boxes, 400, 300) == 1
    assert yolo_detect.choose_product(boxes[2:], 400, 300) == 1  # larger beats slightly more central
    assert yolo_detect.choose_product([], 400, 300) is None
    assert yolo_detect.product_score([0, 0, 10, 10], 400, 300) < yolo_detect.product_score([195, 145, 205, 155], 400, 300)


def test_result_sorts_by_confidence_and_clips_to_the_image():
    result = yolo_detect.detections_result(
        np.array([[10, 10, 50, 50], [-5, 20, 420, 310.04]]), np.array([2, 0]), np.array([0.4, 0.9]),
        {0: "person", 2: "car"}, 400, 300,
    )
    assert result["image_size"] == [400, 300]
    assert [d["label"] for d in result["detections"]] == ["person", "car"]
    assert result["detections"][0]["box"] == [0.0, 20.0, 400.0, 300.0]
    assert result["product_index"] == 0 and [d["is_product"] for d in result["detections"]] == [True, False]


def test_tiny_yolo_detects_in_original_pixels():
    sizes = [(200, 120), (64, 90), (160, 160)]
    outputs = yolo_detect.detect_batch([noise_input(s, i) for i, s in enumerate(sizes)], profile="tiny")
    for out, (w, h) in zip(outputs, sizes):
        assert isinstance(out, StageOutput), out
        result = out.result
        assert result["profile"] == "tiny" and "not meaningful" in result["warning"]
        assert result["image_size"] == [w, h] and result["model"].startswith("yolo11n.yaml")
        detections = result["detections"]
        assert 0 < len(detections) <= 20
        for d in detections:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
            assert isinstance(d["cls"], int) and isinstance(d["label"], str) and 0 < d["confidence"] <= 1
        assert [d["confidence"] for d in detections] == sorted((d["confidence"] for d in detections), reverse=True)
        assert [i for i, d in enumerate(detections) if d["is_product"]] == [result["product_index"]]


def test_batched_detections_equal_one_by_one():
    inputs = [noise_input(s, i, f"v{i}") for i, s in enumerate([(200, 120), (64, 90), (96, 96)])]
    batched = yolo_detect.detect_batch(inputs, profile="tiny")
    single = [yolo_detect.detect_batch([inp], profile="tiny")[0] for inp in inputs]
    assert [o.result for o in batched] == [o.result for o in single]


def test_out_of_memory_halves_the_batch(monkeypatch):
    inputs = [noise_input((96, 64), i, f"v{i}") for i in range(5)]
    whole = yolo_detect.detect_batch(inputs, profile="tiny")
    real_predict, sizes = yolo_detect.predict, []

    def tight_memory(bundle, images):
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_predict(bundle, images)

    monkeypatch.setattr(yolo_detect, "predict", tight_memory)
    halved = yolo_detect.detect_batch(inputs, profile="tiny")
    assert sizes == [5, 2, 3, 1, 2]
    assert [o.result for o in halved] == [o.result for o in whole]


def test_a_bad_image_fails_alone():
    outputs = yolo_detect.detect_batch(
        [stage_input("yolo_detect", image=b"\x89PNG broken"), noise_input((64, 64), 1)], profile="tiny"
    )
    assert isinstance(outputs[0], PermanentStageError)
    assert isinstance(outputs[1], StageOutput)


@pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")
def test_tiny_yolo_on_cuda():
    out = yolo_detect.detect_batch([noise_input((128, 96), 3)], profile="tiny", device="cuda")[0]
    assert isinstance(out, StageOutput) and out.result["image_size"] == [128, 96]
