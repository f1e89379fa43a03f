import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages import fonts, imaging, readability_eval, textlayout
from stages.contract import PermanentStageError
from tests.stages.conftest import PRODUCT_BOX, SCENE_SIZE, encode, make_input, scene, yolo_result

T = readability_eval.THRESHOLDS


def hand_overlay(store, background: Image.Image, colour: str, font_size: int, text="SUMMER SALE"):
    """Text drawn directly with Pillow (not by the overlay stage) and the result describing it."""
    font = fonts.load_font(font_size)
    drawn = background.copy()
    origin = (40, 40)
    ImageDraw.Draw(drawn).text(origin, text, font=font, fill=imaging.hex_to_rgb(colour), anchor="la")
    overlay = {
        "overlay_id": "o1",
        "text_boxes": [{"text": text, "box": list(textlayout.ink_box(text, font, origin))}],
        "text_color": colour,
        "font_size": font_size,
        "scrim": False,
        "artifacts": {"overlay.png": store.put("overlay.png", encode(drawn))},
    }
    return make_input(
        "readability_eval", image=encode(background), results={"overlay": overlay}, read_artifact=store.read
    )


def measure(inp):
    return readability_eval.run(inp).result


def test_black_on_white_is_21_to_1(store):
    res = measure(hand_overlay(store, Image.new("RGB", SCENE_SIZE, "white"), "#000000", 24))
    box = res["boxes"][0]
    assert box["contrast"] == pytest.approx(21.0)
    assert box["background_source"] == "overlay minus ink"
    assert box["passed"] and res["passed"]
    assert res["thresholds"] == T


def test_777777_on_white_fails_as_normal_text_and_passes_as_large_text(store):
    small = measure(hand_overlay(store, Image.new("RGB", SCENE_SIZE, "white"), "#777777", 20))
    assert small["boxes"][0]["contrast"] == pytest.approx(4.478, abs=0.01)
    assert small["boxes"][0]["large_text"] is False
    assert small["boxes"][0]["checks"]["contrast"] is False and small["passed"] is False
    large = measure(hand_overlay(store, Image.new("RGB", SCENE_SIZE, "white"), "#777777", 40))
    assert large["boxes"][0]["large_text"] is True and large["boxes"][0]["required_contrast"] == 3.0
    assert large["passed"] is True


def test_a_text_coloured_patch_under_the_text_fails_even_when_the_mean_would_pass(store):
    background = Image.new("RGB", SCENE_SIZE, "white")
    ImageDraw.Draw(background).rectangle((30, 40, 120, 80), fill="black")  # under the first letters
    res = measure(hand_overlay(store, background, "#000000", 30))
    assert res["boxes"][0]["contrast"] == pytest.approx(1.0)
    assert res["passed"] is False


def test_text_height_is_relative_to_the_image(store):
    res = measure(hand_overlay(store, Image.new("RGB", SCENE_SIZE, "white"), "#000000", 12))
    box = res["boxes"][0]
    assert box["text_height_ratio"] == pytest.approx(12 / SCENE_SIZE[1], abs=1e-4)
    assert box["checks"]["text_height"] is False and res["passed"] is False


def test_busy_background_fails(store):
    stripes = np.zeros((SCENE_SIZE[1], SCENE_SIZE[0], 3), dtype=np.uint8)
    stripes[:, ::4] = 255
    stripes[:, 1::4] = 255
    res = measure(hand_overlay(store, Image.fromarray(stripes), "#ff0000", 30))
    assert res["boxes"][0]["busyness"] > T["max_busyness"]
    assert res["boxes"][0]["checks"]["busyness"] is False


def test_overlay_stage_output_with_a_scrim_passes(render_pipeline, store):
    rng = np.random.default_rng(5)
    noisy = Image.fromarray(rng.integers(0, 255, (SCENE_SIZE[1], SCENE_SIZE[0], 3), dtype=np.uint8))
    image = encode(noisy)
    results = render_pipeline(image, "SUMMER SALE 50% OFF", yolo_result([], product_index=None))
    assert results["overlay"]["scrim"] is True
    res = readability_eval.run(
        make_input("readability_eval", image=image, results=results, read_artifact=store.read)
    ).result
    assert res["boxes"][0]["background_source"] == "overlay minus ink"
    assert res["min_contrast"] >= T["min_contrast_normal"]
    assert res["boxes"][0]["checks"]["contrast"] is True


def test_clean_scene_passes(render_pipeline, store):
    image = encode(scene())
    results = render_pipeline(image, "SUMMER SALE 50% OFF", yolo_result([PRODUCT_BOX]))
    res = readability_eval.run(
        make_input("readability_eval", image=image, results=results, read_artifact=store.read)
    ).result
    assert res["passed"] is True and res["min_contrast"] > 15


def test_size_mismatch_and_missing_overlay_are_refused(store):
    inp = hand_overlay(store, Image.new("RGB", SCENE_SIZE, "white"), "#000000", 24)
    other = make_input(
        "readability_eval",
        image=encode(Image.new("RGB", (300, 300))),
        results=inp.results,
        read_artifact=store.read,
    )
    with pytest.raises(PermanentStageError, match="original is 300x300"):
        readability_eval.run(other)
    with pytest.raises(PermanentStageError, match="overlay result is missing"):
        readability_eval.run(make_input("readability_eval", image=inp.image, results={}))
