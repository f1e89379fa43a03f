import copy

import pytest
from PIL import Image

from stages import ocr_engine, ocr_eval
from stages.contract import PermanentStageError
from tests.stages.conftest import PRODUCT_BOX, SCENE_SIZE, encode, make_input, scene, yolo_result


def evaluate(results, store):
    return ocr_eval.run(make_input("ocr_eval", results=results, read_artifact=store.read)).result


@pytest.mark.parametrize("text", ["SUMMER SALE 50% OFF", "여름 세일 50% 할인"])
def test_rendered_copy_is_read_back_exactly(render_pipeline, store, text):
    results = render_pipeline(encode(scene()), text, yolo_result([PRODUCT_BOX]))
    res = evaluate(results, store)
    assert [b["read"] for b in res["boxes"]] == results["overlay"]["lines"]
    assert " ".join(results["overlay"]["lines"]) == text
    assert res["exact_match"] is True and res["cer"] == 0.0 and res["passed"] is True
    assert res["boxes"][0]["lang"] == ("kor" if text.startswith("여") else "eng")
    assert res["cer_threshold"] == ocr_eval.CER_THRESHOLD
    assert res["engine"] == ocr_engine.default_engine().name


@pytest.mark.parametrize(
    "text, lang",
    [
        ("SUMMER SALE 50% OFF", "eng"),
        ("여름 세일 50% 할인", "kor"),
        ("탄산수 두 캔에 5달러!", "kor"),
        ("신상품 NEW 30%", "kor+eng"),
        ("Café crème", "eng"),
        ("2 + 2 = 4", "eng"),
    ],
)
def test_each_line_is_read_in_the_language_of_its_copy(text, lang):
    assert ocr_eval.line_language(text) == lang


def test_a_mixed_block_reads_each_line_in_its_own_language(render_pipeline, store):
    text = "Sparkling lemon water for the whole family 여름 한정 레몬 탄산수 두 캔에 5달러"
    results = render_pipeline(
        encode(Image.new("RGB", (600, 600), "white")), text, yolo_result([], product_index=None)
    )
    res = evaluate(results, store)
    langs = [b["lang"] for b in res["boxes"]]
    # Where the lines break is the planner's choice; each must still get its own language.
    assert langs == [ocr_eval.line_language(b["expected"]) for b in res["boxes"]]
    assert langs[0] == "eng" and len(set(langs)) > 1, [b["expected"] for b in res["boxes"]]
    assert res["passed"] is True


def test_multi_line_copy_on_white_passes(render_pipeline, store):
    text = "Fresh summer styles for the whole family with free delivery today"
    results = render_pipeline(
        encode(Image.new("RGB", (600, 600), "white")), text, yolo_result([], product_index=None)
    )
    res = evaluate(results, store)
    assert len(res["boxes"]) > 1
    assert res["passed"] is True and res["cer"] <= 0.05


def test_white_text_on_dark_is_read(render_pipeline, store):
    results = render_pipeline(
        encode(Image.new("RGB", SCENE_SIZE, (25, 25, 60))),
        "NEW ARRIVALS",
        yolo_result([], product_index=None),
    )
    assert results["overlay"]["text_color"] == "#ffffff"
    assert evaluate(results, store)["exact_match"] is True


def test_a_wrong_reading_raises_the_error_rate(render_pipeline, store):
    results = render_pipeline(encode(scene()), "SUMMER SALE 50% OFF", yolo_result([PRODUCT_BOX]))
    tampered = copy.deepcopy(results)
    tampered["overlay"]["text_boxes"][0]["text"] = "WINTER DEAL 70% OFF"  # not what was drawn
    res = evaluate(tampered, store)
    assert res["exact_match"] is False and res["passed"] is False
    assert res["cer"] == pytest.approx(
        ocr_eval.levenshtein("WINTER DEAL 70% OFF", "SUMMER SALE 50% OFF") / 19, abs=1e-4
    )


def test_levenshtein_and_normalisation():
    assert ocr_eval.levenshtein("kitten", "sitting") == 3
    assert ocr_eval.levenshtein("", "abc") == 3
    assert ocr_eval.levenshtein("여름 세일", "여름세일") == 1
    assert ocr_eval.normalise("  \u1100\u1161  b \n") == "가 b"


def test_missing_inputs_are_permanent_errors(store):
    with pytest.raises(PermanentStageError, match="overlay result is missing"):
        evaluate({}, store)
    with pytest.raises(PermanentStageError, match="no text boxes"):
        evaluate({"overlay": {"text_boxes": [], "artifacts": {"overlay.png": "k"}}}, store)
    with pytest.raises(PermanentStageError, match="overlay.png"):
        evaluate({"overlay": {"text_boxes": [{"text": "A", "box": [0, 0, 5, 5]}]}}, store)


def engines():
    engines = [ocr_engine.CliEngine()]
    try:
        engines.append(ocr_engine.InProcessEngine())
    except ImportError:  # tesserocr not installed: the CLI engine is the only one to check
        pass
    return engines


@pytest.mark.parametrize("engine", engines(), ids=lambda e: e.name)
def test_missing_tesseract_is_an_environment_error_not_a_permanent_one(
    render_pipeline, store, monkeypatch, tmp_path, engine
):
    import pytesseract

    results = render_pipeline(encode(scene()), "SALE", yolo_result([PRODUCT_BOX]))
    monkeypatch.setattr(pytesseract.pytesseract, "tesseract_cmd", "/nonexistent/tesseract")
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))  # a directory without language data
    inp = make_input("ocr_eval", results=results, read_artifact=store.read)
    with pytest.raises(ocr_eval.TesseractUnavailable, match="not installed.*apt-get install") as info:
        ocr_eval.evaluate(inp, engine)
    assert not isinstance(info.value, PermanentStageError)


@pytest.mark.parametrize("engine", engines(), ids=lambda e: e.name)
def test_missing_korean_data_is_named(render_pipeline, store, monkeypatch, engine):
    results = render_pipeline(encode(scene()), "여름 세일", yolo_result([PRODUCT_BOX]))
    monkeypatch.setattr(engine, "languages", lambda: frozenset({"eng"}))
    inp = make_input("ocr_eval", results=results, read_artifact=store.read)
    with pytest.raises(ocr_eval.TesseractUnavailable, match="missing: kor .*tesseract-ocr-kor"):
        ocr_eval.evaluate(inp, engine)
