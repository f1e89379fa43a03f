from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stages import fonts, imaging, legibility, planner, saliency, textlayout
from stages.boxes import intersection
from stages.contract import PermanentStageError
from tests.stages.conftest import PRODUCT_BOX, SCENE_SIZE, encode, make_input, scene, yolo_result

LONG_COPY = (
    "Meet the lemon water that tastes like the first warm day of the year. Sparkling, bright and "
    "made with real fruit, no sugar and nothing artificial. Chill a can, pour it over ice with a "
    "slice of lemon and share it with friends on the terrace. Order before Friday and get free "
    "delivery anywhere in the city, every day of the week."
)


def grace_face() -> Image.Image:
    """A real face (matplotlib's sample photograph of Grace Hopper): HOG detectors are trained on
    photographs, so a drawing would test the drawing, not the detector."""
    matplotlib = pytest.importorskip("matplotlib")
    path = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():
        pytest.skip("matplotlib ships no grace_hopper.jpg here")
    return Image.open(path).convert("RGB").crop((150, 110, 390, 350))


def needs_face_detector():
    if saliency.face_detector_name() == "none":
        pytest.skip("no face detector installed (dlib-bin)")


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
    assert result["text"] == result["image_text"] == "SUMMER SALE 50% OFF"
    assert result["fallback"] == "" and result["caption_text"] == ""
    ids = [p["proposal_id"] for p in result["proposals"]]
    assert ids == [f"p{i}" for i in range(len(ids))] and len(ids) >= 3
    best = chosen(result)
    assert result["lines"] == best["lines"]
    assert best["score"] == max(p["score"] for p in result["proposals"])
    assert set(best["scores"]) >= {"object_overlap", "product_overlap", "saliency", "busyness", "contrast"}
    assert "score =" in result["scoring"]
    assert result["min_font_size"] == legibility.min_font_px(SCENE_SIZE)


def test_proposals_are_distinct_placements():
    props = plan("SUMMER SALE 50% OFF")["proposals"]
    for i, a in enumerate(props):
        for b in props[i + 1 :]:
            assert planner._iou(a["box"], b["box"]) <= planner.DISTINCT_IOU


@pytest.mark.parametrize("product_box", [PRODUCT_BOX, (40, 30, 760, 200), (40, 400, 760, 570), (0, 0, 500, 600)])
def test_no_proposal_touches_the_planted_product(product_box):
    result = plan("SUMMER SALE 50% OFF", scene(product_box), yolo_result([product_box]))
    assert result["fallback"] == ""
    for p in result["proposals"]:
        assert intersection(p["box"], product_box) is None
        assert p["scores"]["object_overlap"] == 0 and p["scores"]["product_overlap"] == 0


def test_other_objects_are_avoided_too():
    person = (40, 30, 760, 200)
    result = plan("SUMMER SALE", scene(), yolo_result([PRODUCT_BOX, person]))
    for p in result["proposals"]:
        assert intersection(p["box"], PRODUCT_BOX) is None and intersection(p["box"], person) is None


def test_detections_in_other_pixel_units_are_scaled():
    half = yolo_result([[v / 2 for v in PRODUCT_BOX]], size=(400, 300))
    result = plan("SUMMER SALE", scene(), half)
    assert all(intersection(p["box"], PRODUCT_BOX) is None for p in result["proposals"])


def test_a_planted_face_and_its_person_are_never_covered_without_any_detector():
    needs_face_detector()
    img = Image.new("RGB", SCENE_SIZE, (232, 232, 226))
    img.paste(grace_face(), (500, 60))  # face about (530, 100)-(720, 290)
    result = plan("SUMMER SALE 50% OFF", img, yolo_result([], product_index=None))
    assert len(result["faces"]) == 1
    face, person = result["faces"][0]["box"], result["faces"][0]["person"]
    assert 500 <= face[0] < face[2] <= 740 and 60 <= face[1] < face[3] <= 300
    assert person[3] == SCENE_SIZE[1]  # the body below the face reaches the bottom of the frame
    for p in result["proposals"]:
        assert intersection(p["box"], face) is None and intersection(p["box"], person) is None
    assert chosen(result)["box"][2] <= person[0]  # the copy goes on the free side


def test_the_block_stays_inside_the_safe_margins_and_under_a_quarter_of_the_image():
    for p in plan("Fresh summer styles for the whole family, free delivery")["proposals"]:
        m = planner.margin(SCENE_SIZE)
        x1, y1, x2, y2 = p["box"]
        assert x1 >= m and y1 >= m and x2 <= SCENE_SIZE[0] - m and y2 <= SCENE_SIZE[1] - m
        assert (x2 - x1) * (y2 - y1) <= planner.MAX_BLOCK_SHARE * SCENE_SIZE[0] * SCENE_SIZE[1]
        assert p["css_px"] >= legibility.MIN_CSS_PX


def test_font_floor_is_14_css_px_on_a_375_px_phone():
    # The exact floor, then half a pixel of headroom (legibility.FLOOR_HEADROOM_PX: hinting).
    assert legibility.min_font_px((1080, 1080)) == 41  # 14 * 1080 / 375 = 40.3
    assert legibility.min_font_px((800, 1000)) == 31  # scaled x1.35 into the 1080-wide post: 29.9
    # Taller than 4:5: the post is 1350 high and the image shown 1012 px wide, so the floor rises.
    assert legibility.min_font_px((810, 1080)) == 33  # 32.3
    assert legibility.min_font_px((1280, 720)) == 49  # 47.8: 48 px type draws 47 px glyphs
    sizes = planner.font_sizes((800, 1000))
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == 31 and sizes[0] == 120


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
    assert best["scores"]["busyness"] < 0.05
    # The same block moved onto the texture would have scored far busier.
    maps = planner._Search(img, [], []).maps
    x1, y1, x2, y2 = best["box"]
    below = maps.cells(x1, 600 - 24 - (y2 - y1), x2, 600 - 24)
    assert float(planner._box_means(maps.edges, *below)) > best["scores"]["busyness"] + 0.3


def test_long_copy_wraps_and_stays_inside_the_image():
    copy = "Fresh summer styles for the whole family, now with free delivery on every order over fifty dollars"
    result = plan(copy)
    assert len(result["lines"]) > 1 and result["fallback"] == ""
    for p in result["proposals"]:
        assert inside(p["box"], SCENE_SIZE)
        font = fonts.load_font(p["font_size"])
        inner = p["box"][2] - p["box"][0] - 2 * textlayout.padding(p["font_size"])
        assert all(font.getlength(line) <= inner for line in p["lines"])
        assert " ".join(p["lines"]) == copy
        assert p["font_size"] >= legibility.min_font_px(SCENE_SIZE)
        assert len(p["lines"]) <= planner.MAX_LINES


# --- the fallback ladder ---------------------------------------------------------------------------


def test_rung_1_smaller_type_when_the_large_sizes_do_not_fit():
    # Only a strip at the top is free: the copy fits there at a small size, never below the floor.
    product = (0, 150, 800, 600)
    copy = "Fresh summer styles for the whole family"
    result = plan(copy, scene(product), yolo_result([product]))
    best = chosen(result)
    assert result["fallback"] == "" and best["box"][3] <= product[1]
    assert legibility.min_font_px(SCENE_SIZE) <= best["font_size"] < planner.font_sizes(SCENE_SIZE)[0]


def test_rung_2_headline_on_the_image_and_the_rest_in_the_caption():
    result = plan(LONG_COPY)
    assert result["fallback"] == "headline"
    assert result["image_text"] == "Meet the lemon water that tastes like the first warm day of the year."
    assert result["text"] == result["image_text"] == " ".join(result["lines"])
    assert f"{result['image_text']} {result['caption_text']}" == result["copy"] == LONG_COPY
    for p in result["proposals"]:
        assert intersection(p["box"], PRODUCT_BOX) is None


def test_a_copy_too_long_for_any_block_never_fails_the_variant():
    copy = " ".join(["SALE"] * 600)
    result = plan(copy, Image.new("RGB", (200, 200), "white"), yolo_result([], product_index=None))
    assert result["fallback"] == "headline"
    assert result["caption_text"] and f"{result['image_text']} {result['caption_text']}" == copy
    assert chosen(result)["css_px"] >= legibility.MIN_CSS_PX


def test_rung_3_the_canvas_grows_a_band_outside_the_photo_in_its_edge_colour():
    # A product filling all but slivers at the edges: no block fits beside it, and text over the
    # product is never right: the copy goes on a band added above or below the photo.
    product = (0, 30, 800, 570)
    img = scene(product)
    result = plan("SUMMER SALE", img, yolo_result([product]))
    assert result["fallback"] == "extend"
    best = chosen(result)
    canvas = best["canvas"]
    width, height = SCENE_SIZE
    band = canvas["size"][1] - height
    assert canvas["size"][0] == width and 0 < band <= planner.MAX_BLOCK_SHARE * canvas["size"][1]
    x1, y1, x2, y2 = best["box"]
    if best["region"] == "extend_top":
        assert canvas["offset"] == [0, band] and (y1, y2) == (0, band)
    else:
        assert best["region"] == "extend_bottom" and canvas["offset"] == [0, 0] and (y1, y2) == (height, height + band)
    assert (x1, x2) == (0, width) and best["backing"] is False
    # The band continues the photo's edge and the text reads on it.
    edge = img.crop((0, 0, width, 30) if best["region"] == "extend_top" else (0, height - 30, width, height))
    edge_rgb = np.asarray(edge, dtype=np.float64).reshape(-1, 3).mean(axis=0)
    assert max(abs(a - b) for a, b in zip(edge_rgb, imaging.hex_to_rgb(canvas["color"]))) <= 12
    assert best["scores"]["contrast"] >= imaging.WCAG_AA_NORMAL and best["scores"]["subject_covered"] == 0.0
    assert best["css_px"] >= legibility.MIN_CSS_PX


def test_faces_everywhere_still_leave_the_extension_and_the_last_rung_says_why(monkeypatch):
    img = Image.new("RGB", SCENE_SIZE, (200, 200, 200))
    everywhere = saliency.Face((0.0, 0.0, 800.0, 600.0), 1.0, (0.0, 0.0, 800.0, 600.0))
    found = planner.plan(img, "SUMMER SALE", [], faces=[everywhere])
    assert found["fallback"] == "extend" and found["proposals"][0]["canvas"]
    # Were no extension possible either (none fits its share of the canvas at a legible size):
    monkeypatch.setattr(planner, "extensions", lambda search, text: [])
    with pytest.raises(PermanentStageError, match="no place for the ad copy") as err:
        planner.plan(img, "SUMMER SALE", [], faces=[everywhere])
    assert "above or below the photo" in str(err.value) and "covering a face" in str(err.value)


def test_a_band_over_the_photo_never_touches_a_face():
    search = planner._Search(Image.new("RGB", SCENE_SIZE, (40, 90, 160)), [], [])
    bands = search.bands("SUMMER SALE")
    middle = saliency.Face((250.0, 200.0, 550.0, 560.0), 1.0, (0.0, 30.0, 800.0, 600.0))
    clear_of_face = planner._Search(Image.new("RGB", SCENE_SIZE, (40, 90, 160)), [], [middle]).bands("SUMMER SALE")
    assert bands and all(c.box[0] == 0 and c.box[2] == SCENE_SIZE[0] for c in bands)
    assert clear_of_face and all(c.box[3] <= 200 - planner.FACE_CLEARANCE * 360 for c in clear_of_face)


def test_run_reports_the_ladder_failure_per_variant(monkeypatch):
    everywhere = saliency.Face((0.0, 0.0, 800.0, 600.0), 1.0, (0.0, 0.0, 800.0, 600.0))
    monkeypatch.setattr(saliency, "find_faces", lambda img, people=None: [everywhere])
    monkeypatch.setattr(planner, "extensions", lambda search, text: [])  # as if no band fitted either
    with pytest.raises(PermanentStageError, match="no place for the ad copy on this 800x600 image"):
        plan("SUMMER SALE", yolo=yolo_result([], product_index=None))


def test_headlines_are_sentence_then_clause_then_words():
    heads = planner.headlines("Big sale today, everything must go. Come early!")
    assert heads[0] == "Big sale today, everything must go."
    assert heads[1] == "Big sale today,"
    assert heads[-1] == "Big sale today,"  # never fewer than MIN_HEADLINE_WORDS words
    assert planner.headlines("Fresh lemon water for the whole family this summer")[-1] == "Fresh lemon water"
    assert all(len(h) <= planner.MAX_HEADLINE_CHARS for h in heads)


def test_korean_without_spaces_wraps_between_characters():
    copy = "여름맞이특별할인행사지금바로확인하세요" * 2
    result = plan(copy)
    assert len(result["lines"]) > 1
    assert "".join(result["lines"]) == copy


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
    assert "🔥" in result["caption_only"]  # emoji are the caption's (textlayout.apply_emoji_policy)
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


def test_hashtags_and_emoji_stay_off_the_image():
    result = plan("Fresh lemonade 🍋 for summer #Lemon #Summer")
    drawn = " ".join(result["lines"])
    assert "#" not in drawn and "🍋" not in drawn and "Lemon" not in drawn.split()
    assert {"#Lemon", "#Summer", "🍋"} <= set(result["caption_only"])


def test_a_copy_of_only_hashtags_is_refused_clearly():
    with pytest.raises(PermanentStageError, match="hashtags and emoji go to the caption"):
        plan("#sale #summer")


def test_faces_are_searched_where_a_real_detector_saw_persons_only(monkeypatch):
    asked = []
    monkeypatch.setattr(saliency, "find_faces", lambda img, people=None: asked.append(people) or [])
    person = {"box": [10.0, 10.0, 200.0, 590.0], "cls": 0, "label": "person", "confidence": 0.9, "is_product": False}
    bottle = {"box": [600.0, 300.0, 700.0, 500.0], "cls": 39, "label": "bottle", "confidence": 0.9, "is_product": True}

    def yolo(detections, profile):
        return {"image_size": list(SCENE_SIZE), "detections": detections, "product_index": len(detections) - 1,
                "profile": profile}

    plan("SUMMER SALE", yolo=yolo([person, bottle], "real"))
    plan("SUMMER SALE", yolo=yolo([bottle], "real"))
    out = plan("SUMMER SALE", yolo=yolo([person, bottle], "tiny"))
    assert asked == [[(10.0, 10.0, 200.0, 590.0)], [], None]  # the tiny profile's boxes say nothing
    assert out["face_search"] == "whole image"
