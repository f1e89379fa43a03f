"""ocr_eval stage: Tesseract reads each rendered line back; the reading is compared with the copy.

Each line's ink box is cropped (without touching the neighbouring lines), turned into dark text on a
light ground and scaled so Tesseract sees glyphs of the size it was trained on, then read in
single-line mode with the language its copy is in (stages/ocr_engine.py owns the engines). The
character error rate decides pass or fail.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from stages import fonts, imaging
from stages.boxes import parse_box, read_text_boxes
from stages.contract import StageInput, StageOutput
from stages.ocr_engine import Engine, default_engine
from stages.ocr_engine import TesseractUnavailable  # noqa: F401  (callers catch it as ocr_eval's)

CER_THRESHOLD = 0.10
PASS_RULE = "passed when the space-insensitive character error rate over all lines <= cer_threshold"
TARGET_INK_HEIGHT = 48  # px of a line's ink after scaling: an x-height of about 30-40 px
MARGIN_X = 0.5  # crop margins, as a share of the line's ink height
MARGIN_Y = 0.25
BORDER = 20  # white border Tesseract's page segmentation expects around a line


def line_language(text: str) -> str:
    """Tesseract's language set for a line of copy: kor for Hangul, eng for Latin, both for a mix.

    One model reads a line in about half the time of two (bench/cpu_stages.py). Digits and
    punctuation are in both models, so they do not decide; a line of neither script is read as
    eng, as before.
    """
    hangul = fonts.has_hangul(text)
    latin = any(ch.isalpha() and "LATIN" in unicodedata.name(ch, "") for ch in text)
    if hangul and latin:
        return "kor+eng"
    return "kor" if hangul else "eng"


def levenshtein(a: str, b: str) -> int:
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def _no_space(text: str) -> str:
    return _SPACES.sub("", text)


def _crop_bounds(
    box: Sequence[float],
    others: Sequence[Sequence[float]],
    limits: Sequence[float],
    size: tuple[int, int],
) -> tuple[int, int, int, int]:
    """The box plus margins, cut short of other lines' ink above or below and kept inside limits.

    limits is the text block's box where the overlay recorded one: beyond it lies the raw image (or
    the scrim's edge), whose texture Tesseract would read as stray characters.
    """
    x1, y1, x2, y2 = box
    ink_h = max(1.0, y2 - y1)
    top, bottom = y1 - MARGIN_Y * ink_h, y2 + MARGIN_Y * ink_h
    for o in others:
        if o[2] <= x1 or o[0] >= x2:
            continue
        if o[3] <= y1:
            top = max(top, o[3])
        elif o[1] >= y2:
            bottom = min(bottom, o[1])
    left = max(limits[0], x1 - MARGIN_X * ink_h)
    right = min(limits[2], x2 + MARGIN_X * ink_h)
    top, bottom = max(limits[1], top), min(limits[3], bottom)
    # Never cut into the line's own ink, even where a hand-made result puts it past the limits.
    left, top, right, bottom = min(left, x1), min(top, y1), max(right, x2), max(bottom, y2)
    return (
        max(0, int(np.floor(left))),
        max(0, int(np.floor(top))),
        min(size[0], int(np.ceil(right))),
        min(size[1], int(np.ceil(bottom))),
    )


def prepare_line(img: Image.Image, bounds: Sequence[int], ink_height: float, text_rgb) -> Image.Image:
    """Dark text on a light ground, scaled to TARGET_INK_HEIGHT, with a border of background."""
    crop = img.crop(tuple(bounds)).convert("L")
    if imaging.luma(text_rgb) > float(np.median(np.asarray(crop))):
        crop = ImageOps.invert(crop)
    scale = min(8.0, max(0.25, TARGET_INK_HEIGHT / max(1.0, ink_height)))
    resized = crop.resize(
        (max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.Resampling.LANCZOS
    )
    edge = np.concatenate([np.asarray(resized)[0], np.asarray(resized)[-1]])
    return ImageOps.expand(resized, border=BORDER, fill=int(np.median(edge)))


def read_line(line_img: Image.Image, lang: str, engine: Engine | None = None) -> str:
    return normalise((engine or default_engine()).read(line_img, lang))


def run(inp: StageInput) -> StageOutput:
    return evaluate(inp, default_engine())


def evaluate(inp: StageInput, engine: Engine) -> StageOutput:
    """The stage with a given engine: bench/ and the tests compare both on the same input."""
    overlay = inp.results.get("overlay")
    lines = read_text_boxes(overlay, "there is no rendered text to read")
    img = imaging.artifact_image(inp.read_artifact, overlay, "overlay.png", "overlay")
    text_rgb = imaging.parse_colour(overlay.get("text_color", "#000000"), "overlay text_color")
    boxes = [line.box for line in lines]
    limits = parse_box(overlay["box"], "overlay text block") if overlay.get("box") else (0, 0, *img.size)

    rows: list[dict[str, Any]] = []
    distance = distance_nospace = length = length_nospace = 0
    for i, (line, box) in enumerate(zip(lines, boxes, strict=True)):
        expected = normalise(line.text)
        lang = line_language(expected)
        bounds = _crop_bounds(box, boxes[:i] + boxes[i + 1 :], limits, img.size)
        read = read_line(prepare_line(img, bounds, box[3] - box[1], text_rgb), lang, engine)
        d = levenshtein(expected, read)
        d_ns = levenshtein(_no_space(expected), _no_space(read))
        distance, distance_nospace = distance + d, distance_nospace + d_ns
        length, length_nospace = length + len(expected), length_nospace + len(_no_space(expected))
        rows.append(
            {
                "expected": expected,
                "read": read,
                "lang": lang,
                "cer": round(d / max(1, len(expected)), 4),
                "cer_nospace": round(d_ns / max(1, len(_no_space(expected))), 4),
                "exact": read == expected,
                "exact_nospace": _no_space(read) == _no_space(expected),
            }
        )
    cer = distance / max(1, length)
    cer_nospace = distance_nospace / max(1, length_nospace)
    return StageOutput(
        result={
            "overlay_id": overlay.get("overlay_id"),
            "boxes": rows,
            "cer": round(cer, 4),
            "cer_nospace": round(cer_nospace, 4),
            "exact_match": all(r["exact"] for r in rows),
            "exact_match_nospace": all(r["exact_nospace"] for r in rows),
            "cer_threshold": CER_THRESHOLD,
            "pass_rule": PASS_RULE,
            "passed": cer_nospace <= CER_THRESHOLD,
            "engine": engine.name,
        }
    )
