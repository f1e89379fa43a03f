import io
import json
import re

import numpy as np
import pytest
from PIL import Image, ImageCms

from stages import instagram_feed_gen as feed
from stages.contract import PermanentStageError
from tests.stages.conftest import encode, make_input


def finished(
    order, overall, ocr_passed=True, cer=0.0, readable=True, covered=False, key=None, subject="red sneakers",
    quality=1.0, margin=2.0,
):
    return {
        "status": "done",
        "current_step": "iou_eval",
        "creation_order": order,
        "results": {
            "vlm_analyze": {"usable": True, "main_subject": subject},
            "overlay": {"artifacts": {"overlay.png": key or f"overlay-{order}"}},
            "vlm_judge": {"scores": {"overall": overall}, "verdict": "pass"},
            "ocr_eval": {"passed": ocr_passed, "cer": cer, "cer_nospace": cer},
            "planner": {"image_quality": {"score": quality}},
            "readability_eval": {"passed": readable, "min_contrast_margin": margin},
            "iou_eval": {"product_covered": covered, "passed": not covered},
        },
    }


def marked_image(size):
    """An overlay stand-in with coloured corner markers, to prove nothing is cropped away."""
    img = Image.new("RGB", size, (200, 220, 240))
    w, h = size
    for x, y in ((0, 0), (w - 12, 0), (0, h - 12), (w - 12, h - 12)):
        img.paste((255, 0, 0), (x, y, x + 12, y + 12))
    return encode(img)


def run(variants, blobs, english="Summer sale 50% off #SummerSale", korean="여름 세일 50% 할인 #여름세일"):
    inp = make_input(
        "instagram_feed_gen",
        variant_id=None,
        ad_copy=english,
        variants=variants,
        results={"ad_copy_gen_kor": {"korean": korean, "source": english}},
        read_artifact=blobs.__getitem__,
    )
    return feed.run(inp)


def check_instagram_limits(out):
    img = Image.open(io.BytesIO(out.artifacts["post.jpg"]))
    assert img.format == "JPEG" and img.mode == "RGB"
    assert img.width == 1080 and 0.8 <= img.width / img.height <= 1.91
    profile = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
    assert "sRGB" in ImageCms.getProfileDescription(profile)
    assert len(out.artifacts["post.jpg"]) < 8 * 1024 * 1024
    res = out.result
    assert res["image"] == {
        **res["image"],
        "width": img.width,
        "height": img.height,
        "format": "JPEG",
        "bytes": len(out.artifacts["post.jpg"]),
    }
    assert len(res["caption"]) <= 2200
    assert len(re.findall(r"#\w+", res["caption"])) <= 30
    assert json.loads(out.artifacts["post.json"].decode("utf-8"))["caption"] == res["caption"]
    return img


def test_best_variant_is_chosen_by_the_written_rule():
    variants = {
        "a": finished(0, overall=6),
        "b": finished(1, overall=9),
        "c": finished(2, overall=10, covered=True),  # covers the product: loses 0.2
        "d": {**finished(3, overall=10), "status": "failed"},
        "e": {**finished(4, overall=10), "current_step": "ocr_eval"},
    }
    blobs = {f"overlay-{i}": marked_image((600, 600)) for i in range(5)}
    out = run(variants, blobs)
    res = out.result
    assert res["chosen_variant_id"] == "b"
    assert [r["variant_id"] for r in res["ranking"]] == ["b", "a", "c"]  # 0.965, 0.86, 0.85
    assert res["ranking"][0]["score"] == pytest.approx(0.35 * 0.9 + 0.2 + 0.1 + 0.15 + 0.1 + 0.1)
    assert "creation_order" in res["selection_rule"]
    check_instagram_limits(out)


def test_an_under_exposed_or_barely_legible_variant_loses_what_would_be_a_tie():
    blobs = {f"overlay-{i}": marked_image((600, 600)) for i in range(3)}
    variants = {"dark": finished(0, overall=8, quality=0.0), "fine": finished(1, overall=8),
                "faint": finished(2, overall=8, margin=1.2)}
    res = run(variants, blobs).result
    assert [r["variant_id"] for r in res["ranking"]] == ["fine", "faint", "dark"]
    scores = {r["variant_id"]: r for r in res["ranking"]}
    assert scores["dark"]["components"]["image_quality"] == 0.0  # loses 0.1, the earliest variant though it is
    assert scores["faint"]["components"]["legibility_margin"] == pytest.approx(0.2)  # loses 0.08
    assert "image quality" in res["selection_rule"] and "legibility margin" in res["selection_rule"]


def test_results_of_an_older_release_without_the_new_terms_still_rank():
    old = finished(0, overall=9)
    old["results"]["readability_eval"] = {"passed": True}
    del old["results"]["planner"]
    res = run({"old": old}, {"overlay-0": marked_image((600, 600))}).result
    assert res["chosen_variant_id"] == "old" and res["ranking"][0]["components"]["image_quality"] == 0.0


def test_ties_go_to_the_earliest_variant():
    variants = {"late": finished(5, overall=8), "early": finished(1, overall=8)}
    blobs = {"overlay-5": marked_image((600, 600)), "overlay-1": marked_image((600, 600))}
    assert run(variants, blobs).result["chosen_variant_id"] == "early"


def test_no_finished_variant_is_a_permanent_error():
    variants = {"a": {**finished(0, overall=9), "status": "failed"}}
    with pytest.raises(PermanentStageError, match="no variant finished"):
        run(variants, {})


@pytest.mark.parametrize(
    "size, expected",
    [
        ((600, 1200), (1080, 1350)),
        ((1200, 300), (1080, 566)),
        ((800, 800), (1080, 1080)),
        ((900, 1000), (1080, 1200)),
    ],
)
def test_image_is_padded_into_instagram_ratios_without_cropping(size, expected):
    out = run({"a": finished(0, overall=8)}, {"overlay-0": marked_image(size)})
    img = check_instagram_limits(out)
    assert img.size == expected
    # Every corner marker survives: find red blobs in the four quadrants.
    arr = np.asarray(img, dtype=np.int16)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 90) & (arr[..., 2] < 90)
    h, w = red.shape
    quadrants = [
        red[: h // 2, : w // 2],
        red[: h // 2, w // 2 :],
        red[h // 2 :, : w // 2],
        red[h // 2 :, w // 2 :],
    ]
    assert all(q.sum() > 20 for q in quadrants)


def test_caption_has_korean_then_english_then_hashtags():
    out = run({"a": finished(0, overall=8)}, {"overlay-0": marked_image((600, 600))})
    caption = out.result["caption"]
    lines = caption.split("\n")
    assert lines[0].startswith("여름 세일 50% 할인") and lines[1].startswith("Summer sale 50% off")
    tags = out.result["hashtags"]
    assert "#SummerSale" in tags and "#여름세일" in tags  # the copy's own hashtags are kept
    assert "#redsneakers" in tags and "#sneakers" in tags  # derived from vlm_analyze main_subject
    assert len({t.lower() for t in tags}) == len(tags)


def test_caption_limits_hold_for_excessive_copy():
    english = " ".join(f"#tag{i}" for i in range(45)) + " " + "word " * 800
    out = run(
        {"a": finished(0, overall=8)},
        {"overlay-0": marked_image((600, 600))},
        english=english,
        korean="할인 " * 900,
    )
    check_instagram_limits(out)
    assert out.result["hashtags"][0] == "#tag0"


def test_jpeg_quality_drops_to_meet_the_size_limit():
    noise = Image.fromarray(np.random.default_rng(4).integers(0, 255, (1350, 1080, 3), dtype=np.uint8))
    best, _ = feed.encode_under(noise, 10**9)
    data, quality = feed.encode_under(noise, int(len(best) * 0.6))
    assert quality < feed.JPEG_QUALITIES[0] and len(data) < len(best) * 0.6
    with pytest.raises(PermanentStageError, match="over 1000 bytes"):
        feed.encode_under(noise, 1000)


def test_missing_korean_copy_is_refused():
    inp = make_input(
        "instagram_feed_gen",
        variant_id=None,
        ad_copy="x",
        variants={"a": finished(0, overall=8)},
        results={},
        read_artifact={"overlay-0": marked_image((600, 600))}.__getitem__,
    )
    with pytest.raises(PermanentStageError, match="Korean copy"):
        feed.run(inp)


# --- hashtags and emoji in the caption ---------------------------------------------------------------


def test_hashtags_appear_once_whatever_their_case():
    korean = "여름 세일 50% 할인 #Sale #summer\n#여름세일"
    english = "Summer sale 50% off #sale #Summer #SALE #new"
    caption, tags = feed.build_caption(korean, english, "red sneakers")
    assert [t.lower() for t in tags].count("#sale") == 1 and [t.lower() for t in tags].count("#summer") == 1
    assert len({t.lower() for t in tags}) == len(tags)
    assert "#Sale" in tags and "#sale" not in tags  # the first spelling wins
    lines = caption.split("\n")
    # The tag runs moved out of both copy lines into one block at the end.
    assert lines[0] == "여름 세일 50% 할인" and lines[1] == "Summer sale 50% off" and lines[2] == ""
    assert lines[3].split()[:4] == ["#Sale", "#summer", "#여름세일", "#new"]


def test_a_tag_used_as_a_word_stays_in_its_sentence_once():
    caption, tags = feed.build_caption("매일 아침 #coffee 한 잔", "Love #Coffee every morning #coffee", "")
    assert caption.split("\n")[0] == "매일 아침 #coffee 한 잔"
    assert caption.split("\n")[1] == "Love Coffee every morning"  # a repeat keeps its word, loses its '#'
    assert [t.lower() for t in tags].count("#coffee") == 1


def test_a_number_sign_is_not_a_hashtag():
    caption, tags = feed.build_caption("1위 커피", "The #1 coffee in town", "")
    assert "The #1 coffee in town" in caption and "#1" not in tags


def test_caption_keeps_emoji_whole_by_the_shared_policy():
    family, keycap = "👨\u200d👩\u200d👧", "1\ufe0f\u20e3"
    scotland = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"  # tag characters
    caption, _ = feed.build_caption(f"가족 세일 {family} {keycap}", f"Family sale {family} {scotland}\x07", "")
    assert family in caption and scotland in caption and keycap in caption
    assert "\x07" not in caption  # other control characters still go
    from stages import textlayout

    # The same function that keeps them here is the one that leaves them off the image.
    drawn, removed = textlayout.image_text(f"Family sale {family} {scotland}")
    assert drawn == "Family sale" and removed == [family, scotland]
