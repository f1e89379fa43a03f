"""The planner's canvas extension (the copy on a band added outside the photo) through every stage
after it: overlay draws on the taller canvas with the photo untouched, ocr_eval reads it,
readability_eval and iou_eval measure it where the photo now sits, and the post is composed."""
import io

import numpy as np
import pytest
from PIL import Image

from stages import imaging, instagram_feed_gen, iou_eval, ocr_eval, overlay, planner, readability_eval
from stages.contract import PermanentStageError
from tests.stages.conftest import SCENE_SIZE, encode, make_input, scene, yolo_result

COPY = "SUMMER SALE"
FULL_FRAME = (0, 30, 800, 570)  # a product over all but slivers: nothing may go on the photo


def run_chain(store, img: Image.Image, yolo: dict):
    results = {"yolo_detect": yolo}
    image = encode(img)
    for module in (planner, overlay, ocr_eval, readability_eval, iou_eval):
        out = module.run(make_input(module.__name__.rsplit(".", 1)[1], ad_copy=COPY, image=image, results=results,
                                    read_artifact=store.read))
        results[module.__name__.rsplit(".", 1)[1]] = store.record(out)
    return results


def test_the_copy_goes_on_a_band_outside_the_photo_and_every_stage_agrees(store):
    img = scene(FULL_FRAME)
    results = run_chain(store, img, yolo_result([FULL_FRAME]))
    plan, drawn = results["planner"], results["overlay"]
    assert plan["fallback"] == "extend"
    canvas = drawn["canvas"]
    rendered = Image.open(io.BytesIO(store.read(drawn["artifacts"]["overlay.png"]))).convert("RGB")
    assert list(rendered.size) == canvas["size"] == drawn["image_size"]
    ox, oy = canvas["offset"]
    # The photo is on the canvas pixel for pixel; the text is all in the band.
    photo = np.asarray(rendered.crop((ox, oy, ox + SCENE_SIZE[0], oy + SCENE_SIZE[1])), dtype=np.int16)
    assert np.array_equal(photo, np.asarray(img, dtype=np.int16))
    for line in drawn["text_boxes"]:
        x1, y1, x2, y2 = line["box"]
        assert y2 <= oy or y1 >= oy + SCENE_SIZE[1], line
    assert results["ocr_eval"]["passed"], results["ocr_eval"]
    assert results["readability_eval"]["passed"], results["readability_eval"]
    iou = results["iou_eval"]
    assert iou["passed"] and not iou["product_covered"]
    assert iou["objects"][0]["box"] == [FULL_FRAME[0] + ox, FULL_FRAME[1] + oy, FULL_FRAME[2] + ox, FULL_FRAME[3] + oy]
    post, _ = instagram_feed_gen.compose(rendered)
    assert post.width == instagram_feed_gen.FEED_WIDTH
    assert instagram_feed_gen.MIN_ASPECT - 1e-6 <= post.width / post.height <= instagram_feed_gen.MAX_ASPECT + 1e-6


def test_a_canvas_that_does_not_hold_its_photo_is_refused():
    img = scene()
    prop = {"proposal_id": "p0", "box": [0, 600, 800, 680], "font_size": 40, "color": "#000000",
            "lines": [COPY], "align": "center",
            "canvas": {"size": [800, 680], "offset": [0, 100], "photo_size": [800, 600], "color": "#ffffff"}}
    plan = {"text": COPY, "proposal_id": "p0", "proposals": [prop]}
    with pytest.raises(PermanentStageError, match="does not hold the photo"):
        overlay.run(make_input("overlay", ad_copy=COPY, image=encode(img), results={"planner": plan}))
    prop["canvas"] = {**prop["canvas"], "offset": [0, 0], "photo_size": [640, 480]}
    with pytest.raises(PermanentStageError, match="is for a 640x480 photo"):
        overlay.run(make_input("overlay", ad_copy=COPY, image=encode(img), results={"planner": plan}))
    assert imaging.parse_canvas(None, (800, 600)) is None
