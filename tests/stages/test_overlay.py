import io
import uuid

import numpy as np
import pytest
from PIL import Image

from stages import fonts, imaging, overlay, saliency, textlayout
from stages.contract import PermanentStageError
from tests.stages.conftest import PRODUCT_BOX, SCENE_SIZE, encode, make_input, scene, yolo_result


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def ink_extent(before: np.ndarray, after: np.ndarray):
    ys, xs = np.nonzero(np.abs(after - before).max(axis=2) > 0)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def proposal(**overrides):
    base = {
        "proposal_id": "p0",
        "box": [100, 50, 700, 200],
        "font_size": 48,
        "color": "#000000",
        "lines": ["SUMMER SALE", "50% OFF"],
        "align": "center",
    }
    base.update(overrides)
    return base


def run_overlay(img: Image.Image, prop: dict, text="SUMMER SALE 50% OFF"):
    plan = {"text": text, "proposal_id": prop["proposal_id"], "proposals": [prop]}
    return overlay.run(make_input("overlay", ad_copy=text, image=encode(img), results={"planner": plan}))


def test_overlay_result_and_exact_ink_boxes():
    img = scene()
    out = run_overlay(img, proposal())
    res = out.result
    uuid.UUID(res["overlay_id"])
    assert res["proposal_id"] == "p0" and res["lines"] == ["SUMMER SALE", "50% OFF"]
    assert res["font"] == fonts.font_path().rsplit("/", 1)[-1] and res["font_size"] == 48
    assert res["scrim"] is False and res["text_color"] == "#000000"
    before, after = np.asarray(img, dtype=np.int16), decoded(out.artifacts["overlay.png"])
    boxes = [tb["box"] for tb in res["text_boxes"]]
    assert [tb["text"] for tb in res["text_boxes"]] == res["lines"]
    # The union of the recorded ink boxes is exactly where pixels changed.
    union = (
        min(b[0] for b in boxes),
        min(b[1] for b in boxes),
        max(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )
    assert ink_extent(before, after) == union
    for b in boxes:  # and each box is tight: ink touches all four of its edges
        changed = np.abs(after - before).max(axis=2)[b[1] : b[3], b[0] : b[2]] > 0
        assert changed[0].any() and changed[-1].any() and changed[:, 0].any() and changed[:, -1].any()


def test_alignment_moves_the_lines():
    img = Image.new("RGB", SCENE_SIZE, "white")
    left = run_overlay(img, proposal(align="left")).result["text_boxes"]
    right = run_overlay(img, proposal(align="right")).result["text_boxes"]
    assert all(abs(tb["box"][0] - 100) < 30 for tb in left)
    assert all(abs(tb["box"][2] - 700) < 30 for tb in right)


def test_scrim_is_added_on_a_busy_background_and_reaches_the_contrast():
    rng = np.random.default_rng(3)
    img = Image.fromarray(rng.integers(0, 255, (SCENE_SIZE[1], SCENE_SIZE[0], 3), dtype=np.uint8))
    res = run_overlay(img, proposal(color="#ffffff")).result
    assert res["scrim"] is True and res["scrim_color"] == "#000000"
    assert res["background_contrast"] < overlay.MIN_CONTRAST
    after = decoded(run_overlay(img, proposal(color="#ffffff")).artifacts["overlay.png"])
    x1, y1, x2, y2 = res["scrim_box"]
    under = after[y1:y2, x1:x2].reshape(-1, 3)
    background = under[(under != 255).any(axis=1)]  # drop the white text's fill
    assert imaging.worst_contrast((255, 255, 255), imaging.relative_luminance(background)) >= 4.5


def test_scrim_also_calms_a_busy_background_that_has_contrast():
    stripes = np.full((SCENE_SIZE[1], SCENE_SIZE[0], 3), 255, dtype=np.uint8)
    stripes[:, ::3] = 200  # light grey pin stripes: black text keeps > 12:1, but the area is busy
    res = run_overlay(Image.fromarray(stripes), proposal()).result
    assert res["background_contrast"] > 10 and res["background_busyness"] > saliency.MAX_BUSYNESS
    assert res["scrim"] is True and res["scrim_color"] == "#ffffff"
    after = decoded(run_overlay(Image.fromarray(stripes), proposal()).artifacts["overlay.png"])
    x1, y1, x2, y2 = res["scrim_box"]
    assert saliency.edge_density(after[y1 : y1 + 10, x1:x2].mean(axis=2)) <= saliency.MAX_BUSYNESS


def test_no_scrim_when_the_background_is_already_readable():
    res = run_overlay(Image.new("RGB", SCENE_SIZE, (30, 30, 40)), proposal(color="#ffffff")).result
    assert res["scrim"] is False and res["background_contrast"] > 10


def test_long_text_never_leaves_the_image():
    lines = ["A very long line of copy that the planner was told to fit"]
    with pytest.raises(PermanentStageError, match="outside the image"):
        run_overlay(Image.new("RGB", (400, 300), "white"), proposal(box=[0, 0, 400, 120], lines=lines))


def test_box_outside_the_image_is_refused():
    with pytest.raises(PermanentStageError, match="outside"):
        run_overlay(Image.new("RGB", (400, 300), "white"), proposal(box=[0, 0, 900, 120]))


def test_emoji_in_lines_are_never_drawn_as_tofu():
    res = run_overlay(Image.new("RGB", SCENE_SIZE, "white"), proposal(lines=["SALE 🔥", "🔥"])).result
    assert res["lines"] == ["SALE"] and len(res["text_boxes"]) == 1


def test_missing_or_unknown_proposal_is_refused():
    with pytest.raises(PermanentStageError, match="planner result is missing"):
        overlay.run(make_input("overlay", ad_copy="x", image=encode(scene()), results={}))
    plan = {"proposal_id": "p9", "proposals": [proposal()]}
    with pytest.raises(PermanentStageError, match="p9"):
        overlay.run(make_input("overlay", ad_copy="x", image=encode(scene()), results={"planner": plan}))


def test_malformed_proposal_is_refused():
    with pytest.raises(PermanentStageError, match="malformed"):
        run_overlay(scene(), proposal(color="not-a-colour"))


def test_planned_overlay_keeps_off_the_product(render_pipeline):
    results = render_pipeline(encode(scene()), "SUMMER SALE 50% OFF", yolo_result([PRODUCT_BOX]))
    for tb in results["overlay"]["text_boxes"]:
        x1, y1, x2, y2 = tb["box"]
        assert x2 <= PRODUCT_BOX[0] or x1 >= PRODUCT_BOX[2] or y2 <= PRODUCT_BOX[1] or y1 >= PRODUCT_BOX[3]


def test_a_backing_is_laid_at_least_at_backing_opacity_even_on_a_calm_background():
    band = proposal(box=[0, 0, 800, 120], color="#ffffff", backing=True, lines=["SUMMER SALE"])
    res = run_overlay(Image.new("RGB", SCENE_SIZE, (30, 30, 40)), band).result
    assert res["backing"] is True and res["scrim"] is True
    assert res["scrim_alpha"] >= overlay.BACKING_MIN_ALPHA and res["scrim_box"] == [0, 0, 800, 120]
    assert res["legible"] is True


def test_the_scrim_is_the_least_opacity_at_which_every_line_passes():
    rng = np.random.default_rng(7)
    img = Image.fromarray(rng.integers(0, 255, (SCENE_SIZE[1], SCENE_SIZE[0], 3), dtype=np.uint8))
    res = run_overlay(img, proposal(color="#ffffff")).result
    alpha = res["scrim_alpha"]
    assert res["legible"] is True and alpha < 1.0
    # One step less opaque and some line fails the shared measure.
    weaker = round(alpha - 0.05, 2)
    assert weaker in overlay.SCRIM_ALPHA_STEPS or weaker < overlay.SCRIM_ALPHA_STEPS[0]
    if weaker >= overlay.SCRIM_ALPHA_STEPS[0]:
        font = fonts.load_font(48)
        box = (100, 50, 700, 200)
        placed = textlayout.place_lines(["SUMMER SALE", "50% OFF"], font, box, "center")
        ink = [textlayout.ink_box(p.text, font, p.origin) for p in placed]
        scrimmed = imaging.blend_box(img.crop(box), (0, 0, 600, 150), (0, 0, 0), weaker)
        rows = overlay._measure(scrimmed, box, box, placed, ink, font, (255, 255, 255), SCENE_SIZE, True)
        assert not all(r["passed"] for r in rows)


def test_text_below_the_size_floor_gets_no_pretend_fix():
    # 20 px on an 800 px wide image is 9.4 CSS px on a phone: no scrim makes that legible.
    res = run_overlay(Image.new("RGB", SCENE_SIZE, "white"), proposal(font_size=20, box=[100, 50, 400, 120])).result
    assert res["legible"] is False and res["scrim_alpha"] == 1.0
