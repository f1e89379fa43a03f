"""iou_eval stage: how much of each detected object the rendered text covers.

Text is the union of the overlay's line ink boxes, so two lines over one object are not counted
twice. Any coverage of the product fails the creative; other objects fail it above MAX_OBJECT_IOU.
"""

from __future__ import annotations

from dataclasses import replace

from stages import imaging
from stages.boxes import area, covered_area, read_detections, read_text_boxes, union_area
from stages.contract import PermanentStageError, StageInput, StageOutput

MAX_OBJECT_IOU = 0.10
PASS_RULE = "passed when no text covers the product and every object's IoU with the text <= max_object_iou"


def run(inp: StageInput) -> StageOutput:
    overlay = inp.results.get("overlay")
    text_boxes = [line.box for line in read_text_boxes(overlay, "there is no text to compare")]
    size = overlay.get("image_size") or (inp.results.get("yolo_detect") or {}).get("image_size")
    if not size:
        raise PermanentStageError("neither overlay nor yolo_detect records the image size")
    width, height = (int(round(float(v))) for v in size)
    text_area = union_area(text_boxes)
    canvas = imaging.parse_canvas(overlay.get("canvas"))
    if canvas:
        # The photo sits at an offset on the planner's extended canvas: its objects move with it.
        (ox, oy) = canvas["offset"]
        detections = [replace(d, box=(d.box[0] + ox, d.box[1] + oy, d.box[2] + ox, d.box[3] + oy))
                      for d in read_detections(inp.results.get("yolo_detect"), tuple(canvas["photo_size"]))]
    else:
        detections = read_detections(inp.results.get("yolo_detect"), (width, height))

    objects, raw_iou, raw_product_share = [], [0.0], [0.0]
    for det in detections:
        object_area = area(det.box)
        covered = covered_area(det.box, text_boxes)
        union = object_area + text_area - covered
        raw_iou.append(covered / union if union > 0 else 0.0)
        if det.is_product and object_area > 0:
            raw_product_share.append(covered / object_area)
        objects.append(
            {
                "index": det.index,
                "label": det.label,
                "is_product": det.is_product,
                "box": [round(v, 2) for v in det.box],
                "iou": round(covered / union, 4) if union > 0 else 0.0,
                "covered_share": round(covered / object_area, 4) if object_area > 0 else 0.0,
            }
        )
    # Decisions use unrounded values: a sliver of coverage must not round away to 0.
    product_covered = max(raw_product_share) > 0.0
    return StageOutput(
        result={
            "overlay_id": overlay.get("overlay_id"),
            "objects": objects,
            "text_area": round(text_area, 2),
            "max_iou": round(max(raw_iou), 4),
            "product_covered": product_covered,
            "product_covered_share": round(max(raw_product_share), 4),
            "max_object_iou": MAX_OBJECT_IOU,
            "pass_rule": PASS_RULE,
            "passed": not product_covered and max(raw_iou) <= MAX_OBJECT_IOU,
        }
    )
