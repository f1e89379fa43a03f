import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages import fonts, imaging, planner, saliency, textlayout
from stages.boxes import intersection
from stages.contract import PermanentStageError
from tests.stages.conftest import PRODUCT_BOX, SCENE_SIZE, encode, make_input, scene, yolo_result


def plan(copy, img=None, yolo=None):
    img = img if img is not None else scene()
    yolo = yolo if yolo is not None else yolo_result([PRODUCT_BOX])
    return planner.run(
        make_input("planner", ad_copy=copy, image=encode(img), results={"yolo_detect": yolo})
    ).result


def chosen(result):
    return next(p for p in result["proposals"] if p["proposal_id"] == result["proposal_id"])


def inside(box, size):
    return box[0] >= 0 and box[1] >= 0 and box[2] <= size[0] and box[3] <= size[1]


def test_result_shape_and_chosen_proposal():
    result = plan("SUMMER SALE 50% OFF")
    assert result["text"] == "SUMMER SALE 50% OFF"
    ids = [p["proposal_id"] for p in result["proposals"]]
    assert ids == [f"p{i}" for i in range(len(ids))] and len(ids) >= 5
    best = chosen(result)
    assert result["lines"] == best["lines"]
    assert best["score"] == max(
        p["score"] for p in result["proposals"] if p["scores"]["product_overlap"] == 0
    )
    assert set(best["scores"]) >= {"object_overlap", "saliency", "busyness", "contrast"}
    assert "score =" in result["scoring"]


@pytest.mark.parametrize("product_box", [PRODUCT_BOX, (40, 30, 760, 200), (40, 400, 760, 570)])
def test_planner_avoids_the_planted_product(product_box):
    result = plan("SUMMER SALE 50% OFF", scene(product_box), yolo_result([product_box]))
    assert intersection(chosen(result)["box"], product_box) is None
    covering = [p for p in result["proposals"] if intersection(p["box"], product_box)]
    assert covering, "the grid should include proposals over the product"
    assert all(p["scores"]["object_overlap"] > 0 for p in covering)


def test_other_objects_are_avoided_too():
    person = (40, 30, 760, 200)
    result = plan("SUMMER SALE", scene(), yolo_result([PRODUCT_BOX, person]))
    box = chosen(result)["box"]
    assert intersection(box, PRODUCT_BOX) is None and intersection(box, person) is None


def test_detections_in_other_pixel_units_are_scaled():
    half = yolo_result([[v / 2 for v in PRODUCT_BOX]], size=(400, 300))
    result = plan("SUMMER SALE", scene(), half)
    covering = [p for p in result["proposals"] if intersection(p["box"], PRODUCT_BOX)]
    assert all(p["scores"]["product_overlap"] > 0 for p in covering)


def test_text_colour_follows_the_background():
    dark = plan("SALE", Image.new("RGB", SCENE_SIZE, (20, 20, 30)), yolo_result([], product_index=None))
    light = plan("SALE", Image.new("RGB", SCENE_SIZE, (240, 240, 240)), yolo_result([], product_index=None))
    assert chosen(dark)["color"] == "#ffffff"
    assert chosen(light)["color"] == "#000000"
    assert chosen(light)["scores"]["contrast"] > 15


def test_an_image_colour_is_used_when_it_reaches_aaa_contrast():
    img = Image.new("RGB", SCENE_SIZE, (250, 240, 200))
    navy_box = (0, 330, 800, 600)
    ImageDraw.Draw(img).rectangle((0, 330, 799, 599), fill=(20, 30, 90))
    best = chosen(plan("SALE", img, yolo_result([navy_box])))
    assert best["color"] not in ("#000000", "#ffffff")
    r, g, b = imaging.hex_to_rgb(best["color"])
    assert b > r and b > g  # the navy of the image
    assert best["scores"]["contrast"] >= planner.PALETTE_MIN_CONTRAST


def test_busy_half_is_avoided():
    img = Image.new("RGB", SCENE_SIZE, (235, 235, 235))
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 255, (300, 800, 3), dtype=np.uint8)
    img.paste(Image.fromarray(noise), (0, 300))  # bottom half is texture
    result = plan("CALM HERE", img, yolo_result([], product_index=None))
    best = chosen(result)
    assert best["box"][3] <= 300
    bottom = [p for p in result["proposals"] if p["box"][1] >= 300]
    assert bottom and all(p["scores"]["busyness"] > best["scores"]["busyness"] for p in bottom)


def test_long_copy_wraps_and_stays_inside_the_image():
    copy = (
        "Fresh summer styles for the whole family, now with free delivery on every order over fifty dollars"
    )
    result = plan(copy)
    assert len(result["lines"]) > 1
    for p in result["proposals"]:
        assert inside(p["box"], SCENE_SIZE)
        font = fonts.load_font(p["font_size"])
        inner = p["box"][2] - p["box"][0] - 2 * textlayout.padding(p["font_size"])
        assert all(font.getlength(line) <= inner for line in p["lines"])
        assert " ".join(p["lines"]) == copy
        assert p["font_size"] >= round(SCENE_SIZE[1] * planner.MIN_FONT_RATIO)


def test_korean_without_spaces_wraps_between_characters():
    copy = "여름맞이특별할인행사지금바로확인하세요" * 2
    result = plan(copy)
    assert len(result["lines"]) > 1
    assert "".join(result["lines"]) == copy


def test_copy_too_long_for_the_image_is_refused_with_a_reason():
    copy = " ".join(["SALE"] * 600)
    with pytest.raises(PermanentStageError, match=rf"ad copy too long for the image: {len(copy)} characters"):
        plan(copy, Image.new("RGB", (200, 200), "white"), yolo_result([], product_index=None))


def test_copy_that_only_fits_the_whole_image_uses_it():
    copy = "BIG SUMMER SALE ON EVERYTHING TODAY ONLY " * 10
    result = plan(copy, Image.new("RGB", (320, 320), "white"), yolo_result([], product_index=None))
    assert [p["region"] for p in result["proposals"]] == ["full"]
    assert inside(chosen(result)["box"], (320, 320))


@pytest.mark.parametrize("copy", ["", "   \n\t ", "🔥🔥🎉", "\x07\x1b"])
def test_empty_copy_is_refused(copy):
    with pytest.raises(PermanentStageError, match="empty"):
        plan(copy)


def test_nul_in_copy_is_refused():
    with pytest.raises(PermanentStageError, match="NUL"):
        plan("SALE\x00 NOW")


def test_emoji_and_control_characters_are_removed_from_the_copy():
    result = plan("SUMMER 🔥 SALE\x07\r\n50% OFF ☀️")
    assert result["text"] == "SUMMER SALE 50% OFF"
    assert "🔥" in result["dropped_characters"]
    assert all("🔥" not in line for p in result["proposals"] for line in p["lines"])


def test_missing_detection_result_is_refused():
    with pytest.raises(PermanentStageError, match="yolo_detect"):
        planner.run(make_input("planner", ad_copy="SALE", image=encode(scene()), results={}))


def test_bad_image_is_refused():
    with pytest.raises(PermanentStageError, match="empty"):
        planner.run(
            make_input("planner", ad_copy="SALE", image=b"", results={"yolo_detect": yolo_result([])})
        )


# --- the maps and the layout the planner relies on ------------------------------------------------


def test_saliency_peaks_on_the_odd_object():
    img = Image.new("L", (256, 256), 128)
    ImageDraw.Draw(img).ellipse((170, 170, 210, 210), fill=250)
    sal = saliency.spectral_residual(np.asarray(img, dtype=np.float64))
    assert sal.shape == (256, 256) and 0.0 <= sal.min() and sal.max() <= 1.0
    assert sal[160:220, 160:220].mean() > 3 * sal[20:80, 20:80].mean()


def test_edge_density_separates_flat_from_textured():
    flat = np.full((50, 50), 200.0)
    stripes = np.tile(np.repeat([0.0, 255.0], 2), (50, 13))[:, :50]
    assert saliency.edge_density(flat) == 0.0
    assert saliency.edge_density(stripes) > 0.9


def test_box_mean_matches_numpy():
    values = np.random.default_rng(2).random((40, 60))
    table = saliency.integral_image(values)
    assert saliency.box_mean(table, (5, 7, 33, 21)) == pytest.approx(values[7:21, 5:33].mean())


def test_wrap_breaks_overlong_words_and_refuses_impossible_widths():
    font = fonts.load_font(40)
    lines = textlayout.wrap_text("A SUPERCALIFRAGILISTIC deal", font, 150)
    assert all(font.getlength(line) <= 150 for line in lines)
    assert "".join(lines).replace(" ", "").replace("-", "") == "ASUPERCALIFRAGILISTICdeal"
    assert textlayout.wrap_text("WIDE", font, 5) is None
