"""Person segmentation (stages/people.py) on real photographs, and the planner keeping copy off the
people it finds when no detector with real weights ran (the tiny profile)."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from console.samples import sample_images
from stages import imaging, people, planner
from tests.stages.conftest import encode, make_input, yolo_result

# ultralytics' zidane.jpg, 1280x720: the two men, boxes drawn by hand (as in bench/eval_set.json).
ZIDANE_PEOPLE = [(125, 200, 1150, 720), (750, 40, 1140, 720)]


def needs_segmenter():
    if people.finder_name() == "none":
        pytest.skip("no person segmenter installed (mediapipe 0.10.14, see the Makefile)")


def zidane() -> Image.Image:
    ultralytics = pytest.importorskip("ultralytics")
    path = Path(ultralytics.__file__).parent / "assets" / "zidane.jpg"
    if not path.is_file():
        pytest.skip("ultralytics ships no assets/zidane.jpg here")
    return imaging.load_image(path.read_bytes())


def covered_by(inner, boxes) -> float:
    """Share of `inner` inside the union of `boxes` (pixel grid)."""
    x1, y1, x2, y2 = inner
    grid = np.zeros((y2 - y1, x2 - x1), dtype=bool)
    for bx1, by1, bx2, by2 in boxes:
        grid[max(0, int(by1) - y1):max(0, int(by2) - y1), max(0, int(bx1) - x1):max(0, int(bx2) - x1)] = True
    return float(grid.mean())


def test_both_men_in_zidane_are_found_though_one_face_is_a_profile():
    needs_segmenter()
    found = people.find_people(zidane())
    assert found, "nobody found in a photograph of two men"
    for person in ZIDANE_PEOPLE:
        assert covered_by(person, found) >= 0.85, (person, found)


def test_product_shots_have_nobody_in_them():
    needs_segmenter()
    for name, img in sample_images():
        assert people.find_people(img) == [], name


def test_without_a_trusted_detector_the_copy_never_touches_a_person(render_pipeline, store):
    """The tiny profile's YOLO found nothing: the planner segments the people itself, and no pixel
    the overlay changed lies inside either man's box (measured on the pixels, not from the plan)."""
    needs_segmenter()
    img = zidane()
    results = render_pipeline(encode(img), "Summer sale 50% off", yolo_result([], size=img.size, product_index=None))
    plan = results["planner"]
    assert plan["person_finder"] == people.NAME and plan["persons"]
    canvas = results["overlay"].get("canvas")
    ox, oy = canvas["offset"] if canvas else (0, 0)
    before = imaging.rgb_array(imaging.extend_canvas(img, canvas) if canvas else img)
    after = imaging.rgb_array(imaging.load_image(store.read(results["overlay"]["artifacts"]["overlay.png"])))
    changed = np.abs(after - before).max(axis=2) > 8
    assert changed.any()
    for x1, y1, x2, y2 in ZIDANE_PEOPLE:
        assert not changed[y1 + oy:y2 + oy, x1 + ox:x2 + ox].any(), (x1, y1, x2, y2)


def test_a_trusted_detector_is_not_second_guessed():
    """yolo_detect with real weights drew the persons (here: none): no segmentation runs."""
    img = zidane()
    yolo = {**yolo_result([], size=img.size, product_index=None), "profile": "real"}
    result = planner.run(make_input("planner", ad_copy="SALE", image=encode(img), results={"yolo_detect": yolo})).result
    assert result["person_finder"] == "trusted detector" and result["persons"] == []
