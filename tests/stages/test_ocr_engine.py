"""The two Tesseract engines read the same crops alike; the in-process one is per thread and fails clearly."""

from __future__ import annotations

import builtins
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageDraw

from stages import fonts, ocr_engine, ocr_eval
from tests.stages.conftest import PRODUCT_BOX, encode, make_input, scene, yolo_result

pytest.importorskip("tesserocr")

# Latin, Korean, Korean with Latin, and Korean with digits: every language set line_language picks.
LINES = (
    "SUMMER SALE 50% OFF",
    "Sparkling lemon water. Zero sugar, all",
    "summer. 2 for $5 this week! #stayfresh",
    "여름 세일 50% 할인",
    "탄산수 두 캔에 5달러",
    "신상품 NEW ARRIVALS 30% 할인",
    "가을 컬렉션 Autumn Collection",
)
# (text size px, text colour, ground): dark on light, light on dark, the samples' green on yellow.
STYLES = ((32, (20, 20, 20), (245, 245, 240)), (48, (255, 255, 255), (30, 40, 90)),
          (24, (34, 120, 74), (246, 214, 64)))


def drawn_line(text: str, size: int, fg, bg) -> Image.Image:
    """One line drawn with the render font, cropped and prepared exactly as ocr_eval prepares it.

    Drawn here rather than by planner and overlay so that the crops stay the same whatever those
    stages decide about line breaks and sizes.
    """
    font = fonts.load_font(size)
    x1, y1, x2, y2 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    img = Image.new("RGB", (x2 - x1 + 2 * size, y2 - y1 + 2 * size), bg)
    ImageDraw.Draw(img).text((size - x1, size - y1), text, font=font, fill=fg)
    box = (size, size, size + x2 - x1, size + y2 - y1)
    bounds = ocr_eval._crop_bounds(box, [], (0, 0, *img.size), img.size)
    return ocr_eval.prepare_line(img, bounds, box[3] - box[1], fg)


@pytest.fixture(scope="module")
def engines():
    return ocr_engine.CliEngine(), ocr_engine.InProcessEngine()


@pytest.fixture(scope="module")
def crops() -> list[tuple[str, Image.Image]]:
    return [(text, drawn_line(text, *style)) for text in LINES for style in STYLES]


def test_both_engines_read_every_crop_alike(engines, crops):
    cli, in_process = engines
    langs, exact = set(), 0
    for text, crop in crops:
        lang = ocr_eval.line_language(text)
        langs.add(lang)
        expected = cli.read(crop, lang)
        assert in_process.read(crop, lang) == expected, (text, lang)
        exact += ocr_eval.normalise(expected) == text
    assert langs == {"eng", "kor", "kor+eng"}
    assert exact >= len(crops) // 2  # the crops are legible: agreeing on garbage would prove nothing


def test_the_stage_gives_the_same_result_with_either_engine(engines, render_pipeline, store):
    results = render_pipeline(encode(scene()), "가을 컬렉션 Autumn Collection 2026 지금 만나보세요",
                              yolo_result([PRODUCT_BOX]))
    inp = make_input("ocr_eval", results=results, read_artifact=store.read)
    by_cli, by_api = (ocr_eval.evaluate(inp, engine).result for engine in engines)
    assert (by_cli["engine"], by_api["engine"]) == ("pytesseract", "tesserocr")
    assert {k: v for k, v in by_cli.items() if k != "engine"} == {k: v for k, v in by_api.items() if k != "engine"}
    assert {b["lang"] for b in by_api["boxes"]} >= {"kor+eng"}


def test_one_loaded_api_per_language_per_thread(crops):
    engine = ocr_engine.InProcessEngine()
    text, crop = crops[0]
    first = engine.api("eng")
    assert engine.api("eng") is first and engine.api("kor") is not first
    seen, readings, errors = [], [], []

    def work():
        try:
            seen.append(engine.api("eng"))
            readings.append(engine.read(crop, "eng"))
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len({id(api) for api in seen} | {id(first)}) == 5  # no thread borrowed another's
    assert readings == [engine.read(crop, "eng")] * 4 and readings[0].strip() == text


def test_engines_run_concurrently_from_a_thread_pool(crops):
    engine = ocr_engine.InProcessEngine()
    jobs = [(text, crop, ocr_eval.line_language(text)) for text, crop in crops] * 3
    alone = [ocr_eval.normalise(engine.read(crop, lang)) for _, crop, lang in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        pooled = list(pool.map(lambda job: ocr_eval.normalise(engine.read(job[1], job[2])), jobs))
    assert pooled == alone


def test_default_engine_is_in_process_where_tesserocr_imports():
    assert ocr_engine.default_engine().name == "tesserocr"


def test_without_tesserocr_the_cli_engine_is_the_default(monkeypatch):
    real_import = builtins.__import__

    def no_tesserocr(name, *args, **kwargs):
        if name == "tesserocr":
            raise ImportError("No module named 'tesserocr'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tesserocr)
    ocr_engine.default_engine.cache_clear()
    try:
        assert ocr_engine.default_engine().name == "pytesseract"
    finally:
        monkeypatch.undo()
        ocr_engine.default_engine.cache_clear()


def test_tessdata_is_found_and_named_when_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("TESSDATA_PREFIX", raising=False)
    found = ocr_engine.find_tessdata()
    assert (found / "eng.traineddata").is_file()
    with pytest.raises(ocr_engine.TesseractUnavailable, match=r"not installed.*apt-get install tesseract-ocr"):
        ocr_engine.find_tessdata((str(tmp_path),))
    (tmp_path / "eng.traineddata").write_bytes((found / "eng.traineddata").read_bytes())
    monkeypatch.setenv("TESSDATA_PREFIX", str(tmp_path))
    assert ocr_engine.find_tessdata() == tmp_path


def test_a_missing_language_pack_is_named_by_the_in_process_engine(tmp_path, crops):
    (tmp_path / "eng.traineddata").write_bytes((ocr_engine.find_tessdata() / "eng.traineddata").read_bytes())
    engine = ocr_engine.InProcessEngine(tmp_path)
    text, crop = crops[0]
    assert ocr_eval.normalise(engine.read(crop, "eng")) == text
    with pytest.raises(ocr_engine.TesseractUnavailable, match=r"missing: kor \(Debian: apt-get install tesseract-ocr-kor\)"):
        engine.read(crop, "kor+eng")


def test_unreadable_language_data_is_an_environment_error(tmp_path, crops):
    (tmp_path / "eng.traineddata").write_bytes(b"not a model")
    engine = ocr_engine.InProcessEngine(tmp_path)
    with pytest.raises(ocr_engine.TesseractUnavailable, match="could not load eng"):
        engine.read(crops[0][1], "eng")
