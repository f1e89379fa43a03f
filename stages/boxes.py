"""Rectangle geometry, and the reading of the boxes other stages recorded (detections, text lines)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from stages.contract import PermanentStageError

Rect = tuple[float, float, float, float]


@dataclass(frozen=True)
class TextBox:
    text: str
    box: Rect  # the line's ink box in the overlay image's pixels


@dataclass(frozen=True)
class Detection:
    index: int
    box: Rect  # in the decoded image's pixels
    label: str
    is_product: bool


def area(rect: Sequence[float]) -> float:
    x1, y1, x2, y2 = rect
    return max(0.0, x2 - x1) * max(0.0, y2 - y1)


def intersection(a: Sequence[float], b: Sequence[float]) -> Rect | None:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    if x2 <= x1 or y2 <= y1:
        return None
    return x1, y1, x2, y2


def union_area(rects: Sequence[Sequence[float]]) -> float:
    """Exact area of a union of rectangles (coordinate compression; fine for a few dozen)."""
    rects = [r for r in rects if area(r) > 0]
    if not rects:
        return 0.0
    xs = sorted({r[0] for r in rects} | {r[2] for r in rects})
    total = 0.0
    for left, right in zip(xs, xs[1:], strict=False):
        spans = sorted((r[1], r[3]) for r in rects if r[0] <= left and r[2] >= right)
        covered, end = 0.0, -math.inf
        for y1, y2 in spans:
            if y1 > end:
                covered += y2 - y1
                end = y2
            elif y2 > end:
                covered += y2 - end
                end = y2
        total += covered * (right - left)
    return total


def covered_area(target: Sequence[float], rects: Sequence[Sequence[float]]) -> float:
    """Area of target covered by the union of rects."""
    clipped = [c for c in (intersection(target, r) for r in rects) if c is not None]
    return union_area(clipped)


def parse_box(raw: Any, what: str) -> Rect:
    try:
        x1, y1, x2, y2 = (float(v) for v in raw)
    except (TypeError, ValueError):
        raise PermanentStageError(f"{what}: box must be four numbers [x1, y1, x2, y2], got {raw!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise PermanentStageError(f"{what}: box has a non-finite coordinate: {raw!r}")
    return min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)


def read_detections(yolo: Mapping[str, Any] | None, image_size: tuple[int, int]) -> list[Detection]:
    """yolo_detect's detections mapped into the decoded image's pixels and clipped to it.

    If yolo_detect measured a different size (it decoded differently), boxes are scaled over.
    """
    if yolo is None:
        raise PermanentStageError("the yolo_detect result is missing: object positions are unknown")
    width, height = image_size
    sx = sy = 1.0
    measured = yolo.get("image_size")
    if measured:
        try:
            mw, mh = (float(v) for v in measured)
        except (TypeError, ValueError):
            raise PermanentStageError(f"yolo_detect image_size is not [w, h]: {measured!r}") from None
        if mw > 0 and mh > 0:
            sx, sy = width / mw, height / mh
    product_index = yolo.get("product_index")
    detections: list[Detection] = []
    for index, det in enumerate(yolo.get("detections") or []):
        if not isinstance(det, Mapping):
            raise PermanentStageError(f"yolo_detect detection {index} is not an object: {det!r}")
        x1, y1, x2, y2 = parse_box(det.get("box"), f"yolo_detect detection {index}")
        box = (
            min(max(x1 * sx, 0.0), width),
            min(max(y1 * sy, 0.0), height),
            min(max(x2 * sx, 0.0), width),
            min(max(y2 * sy, 0.0), height),
        )
        detections.append(
            Detection(
                index=index,
                box=box,
                label=str(det.get("label", det.get("cls", "object"))),
                is_product=bool(det.get("is_product")) or index == product_index,
            )
        )
    return detections


def read_text_boxes(overlay: Mapping[str, Any] | None, purpose: str) -> list[TextBox]:
    """The overlay's drawn lines; purpose completes the error message ("there is nothing to read")."""
    if not overlay:
        raise PermanentStageError(f"the overlay result is missing: {purpose}")
    entries = overlay.get("text_boxes") or []
    if not entries:
        raise PermanentStageError(f"the overlay result has no text boxes: {purpose}")
    boxes = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise PermanentStageError(f"overlay text box {i} is not an object: {entry!r}")
        boxes.append(
            TextBox(str(entry.get("text", "")), parse_box(entry.get("box"), f"overlay text box {i}"))
        )
    return boxes
