import pytest

from stages import iou_eval
from stages.boxes import covered_area, union_area
from stages.contract import PermanentStageError
from tests.stages.conftest import PRODUCT_BOX, encode, make_input, scene, yolo_result


def evaluate(text_boxes, detections, product_index=0, size=(800, 600), yolo_size=None):
    overlay = {
        "overlay_id": "o1",
        "image_size": list(size),
        "text_boxes": [{"text": f"line{i}", "box": list(b)} for i, b in enumerate(text_boxes)],
    }
    yolo = yolo_result(detections, size=yolo_size or size, product_index=product_index)
    return iou_eval.run(make_input("iou_eval", results={"overlay": overlay, "yolo_detect": yolo})).result


def test_iou_and_coverage_match_hand_computation():
    res = evaluate([(0, 0, 100, 100)], [(50, 50, 150, 150)], product_index=None)
    obj = res["objects"][0]
    # intersection 50*50 = 2500; union 10000 + 10000 - 2500 = 17500
    assert obj["iou"] == pytest.approx(2500 / 17500, abs=1e-4)
    assert obj["covered_share"] == pytest.approx(0.25)
    assert obj["is_product"] is False and res["product_covered"] is False
    assert res["max_iou"] == pytest.approx(0.1429, abs=1e-4)
    assert res["passed"] is False  # 0.143 > MAX_OBJECT_IOU


def test_overlapping_text_boxes_are_counted_once():
    res = evaluate([(0, 0, 100, 100), (50, 0, 150, 100)], [(0, 0, 200, 100)], product_index=None)
    obj = res["objects"][0]
    # text union 15000, all inside the 20000 object: iou = 15000 / 20000
    assert obj["iou"] == pytest.approx(0.75) and obj["covered_share"] == pytest.approx(0.75)
    assert res["text_area"] == pytest.approx(15000)


def test_any_product_coverage_fails():
    res = evaluate([(0, 0, 300.5, 50)], [PRODUCT_BOX, (0, 0, 50, 50)], product_index=0)
    assert res["objects"][0]["is_product"] and res["objects"][0]["covered_share"] == 0.0
    sliver = evaluate([(0, 0, 300.5, 250)], [PRODUCT_BOX], product_index=0)
    assert sliver["product_covered"] is True and sliver["passed"] is False
    assert sliver["product_covered_share"] == pytest.approx(0.5 * 50 / (200 * 220), abs=1e-4)


def test_product_index_marks_the_product_without_the_flag():
    overlay = {"image_size": [800, 600], "text_boxes": [{"text": "A", "box": [0, 0, 100, 100]}]}
    yolo = {
        "image_size": [800, 600],
        "product_index": 1,
        "detections": [
            {"box": [400, 400, 500, 500], "label": "cup"},
            {"box": [50, 50, 150, 150], "label": "shoe"},
        ],
    }
    res = iou_eval.run(make_input("iou_eval", results={"overlay": overlay, "yolo_detect": yolo})).result
    assert [o["is_product"] for o in res["objects"]] == [False, True]
    assert res["product_covered"] is True and res["product_covered_share"] == pytest.approx(0.25)


def test_clear_text_passes_and_reports_every_object():
    res = evaluate([(20, 20, 280, 80)], [PRODUCT_BOX, (600, 400, 700, 500)], product_index=0)
    assert [o["index"] for o in res["objects"]] == [0, 1]
    assert res["max_iou"] == 0.0 and res["product_covered"] is False and res["passed"] is True


def test_no_detections_passes():
    res = evaluate([(20, 20, 280, 80)], [], product_index=None)
    assert res["objects"] == [] and res["max_iou"] == 0.0 and res["passed"] is True


def test_detections_are_scaled_to_the_overlay_pixels():
    res = evaluate([(0, 0, 100, 100)], [(25, 25, 75, 75)], product_index=None, yolo_size=(400, 300))
    assert res["objects"][0]["box"] == [50, 50, 150, 150]
    assert res["objects"][0]["iou"] == pytest.approx(2500 / 17500, abs=1e-4)


def test_union_geometry():
    assert union_area([(0, 0, 2, 2), (1, 1, 3, 3)]) == pytest.approx(7)
    assert union_area([(0, 0, 4, 4), (1, 1, 2, 2)]) == pytest.approx(16)
    assert covered_area((0, 0, 10, 10), [(5, 5, 20, 20), (-5, -5, 2, 2)]) == pytest.approx(25 + 4)


def test_bad_boxes_are_refused():
    with pytest.raises(PermanentStageError, match="four numbers"):
        evaluate([(0, 0, 10)], [])
    with pytest.raises(PermanentStageError, match="overlay result is missing"):
        iou_eval.run(make_input("iou_eval", results={"yolo_detect": yolo_result([])}))


def test_planned_overlay_passes(render_pipeline):
    results = render_pipeline(encode(scene()), "SUMMER SALE 50% OFF", yolo_result([PRODUCT_BOX]))
    res = iou_eval.run(make_input("iou_eval", results=results)).result
    assert res["product_covered"] is False and res["passed"] is True
