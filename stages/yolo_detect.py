"""yolo_detect: Ultralytics YOLO over a batch of variant images, boxes in original image pixels.

One detection is marked as the product: the one that is both large and central, which is how ad
images are composed (the generator is asked for a product shot). Later stages keep text off it.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from stages.contract import StageInput, StageOutput
from stages.imaging import load_image
from stages.models import YoloBundle, load_yolo, profile_marker, run_halving_on_oom


def _setting(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


def thresholds() -> dict[str, float]:
    return {
        "conf": _setting("YOLO_CONF", 0.25),
        "iou": _setting("YOLO_IOU", 0.7),
        "max_det": int(_setting("YOLO_MAX_DET", 100)),
    }


def product_score(box: Sequence[float], width: int, height: int) -> float:
    """Area share times centrality (1 at the image centre, 0 at a corner)."""
    x1, y1, x2, y2 = box
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1) / float(width * height)
    offset = math.hypot((x1 + x2) / 2 - width / 2, (y1 + y2) / 2 - height / 2)
    centrality = 1.0 - min(1.0, offset / math.hypot(width / 2, height / 2))
    return area * centrality


def choose_product(boxes: Sequence[Sequence[float]], width: int, height: int) -> int | None:
    if not len(boxes):
        return None
    scores = [product_score(b, width, height) for b in boxes]
    # max() keeps the first of equal scores; detections arrive sorted by confidence.
    return max(range(len(scores)), key=scores.__getitem__)


def detections_result(
    xyxy: np.ndarray, cls: np.ndarray, conf: np.ndarray, names: dict[int, str], width: int, height: int,
) -> dict[str, Any]:
    """The stage's result from raw detections (already in original pixels), most confident first."""
    order = np.argsort(-np.asarray(conf, dtype=np.float64), kind="stable")
    detections = []
    for i in order:
        x1, y1, x2, y2 = (float(v) for v in xyxy[i])
        box = [
            round(min(max(x1, 0.0), width), 1), round(min(max(y1, 0.0), height), 1),
            round(min(max(x2, 0.0), width), 1), round(min(max(y2, 0.0), height), 1),
        ]
        label_id = int(cls[i])
        detections.append({
            "box": box, "cls": label_id, "label": str(names.get(label_id, label_id)),
            "confidence": float(f"{float(conf[i]):.4g}"), "is_product": False,
        })
    product = choose_product([d["box"] for d in detections], width, height)
    if product is not None:
        detections[product]["is_product"] = True
    return {"image_size": [width, height], "detections": detections, "product_index": product}


def predict(bundle: YoloBundle, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, dict]]:
    """Detections for BGR uint8 arrays (ultralytics' numpy convention), one batch."""
    limits = thresholds()
    options: dict[str, Any] = {"quantize": 16} if bundle.half else {}
    with bundle.lock:
        # rect=False letterboxes every image to the same square, as a mixed-size batch must be:
        # an image's detections then do not depend on which other images shared its batch.
        results = bundle.model.predict(
            source=images, imgsz=bundle.imgsz, conf=limits["conf"], iou=limits["iou"],
            max_det=limits["max_det"], device=bundle.device, batch=len(images), rect=False,
            verbose=False, save=False, **options,
        )
    return [
        (r.boxes.xyxy.cpu().numpy(), r.boxes.cls.cpu().numpy(), r.boxes.conf.cpu().numpy(), dict(r.names))
        for r in results
    ]


def detect_batch(
    inputs: Sequence[StageInput], profile: str | None = None, device: str = "cpu",
) -> list[StageOutput | BaseException]:
    try:
        bundle = load_yolo(profile, device)
    except Exception as exc:  # a configuration problem: every input gets it
        return [exc] * len(inputs)
    outputs: list[StageOutput | BaseException | None] = [None] * len(inputs)
    arrays: list[np.ndarray] = []
    positions: list[int] = []
    for i, inp in enumerate(inputs):
        try:
            rgb = np.asarray(load_image(inp.image))
        except Exception as exc:
            outputs[i] = exc
            continue
        arrays.append(np.ascontiguousarray(rgb[:, :, ::-1]))
        positions.append(i)
    if arrays:
        try:
            found = run_halving_on_oom(lambda part: predict(bundle, part), arrays)
        except Exception as exc:
            found = None
            for i in positions:
                outputs[i] = exc
        if found is not None:
            limits = thresholds()
            for i, array, (xyxy, cls, conf, names) in zip(positions, arrays, found):
                height, width = array.shape[:2]
                result = detections_result(xyxy, cls, conf, names, width, height)
                result.update({
                    "model": bundle.name, "imgsz": bundle.imgsz, "conf_threshold": limits["conf"],
                    **profile_marker(bundle.profile),
                })
                outputs[i] = StageOutput(result=result)
    return outputs  # type: ignore[return-value]


def warm(profile: str | None = None, device: str = "cpu") -> YoloBundle:
    bundle = load_yolo(profile, device)
    # The first predict builds ultralytics' predictor (and fuses layers): pay for it at start.
    predict(bundle, [np.zeros((64, 64, 3), dtype=np.uint8)])
    return bundle
