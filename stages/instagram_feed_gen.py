"""instagram_feed_gen stage (job level): picks the best finished variant and builds the feed post.

The image is only scaled and padded, never cropped, so no rendered text is cut away; it leaves as an
sRGB JPEG 1080 px wide, aspect ratio between 4:5 and 1.91:1, under 8 MB. The caption is the Korean
copy, the English copy and one block of hashtags (each once, whatever its case), within Instagram's
30-hashtag and 2,200-character limits.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, Mapping

import numpy as np
from PIL import Image

from stages import imaging, textlayout
from stages.contract import PermanentStageError, StageInput, StageOutput

FEED_WIDTH = 1080
MIN_ASPECT = 4 / 5  # width / height, tallest portrait Instagram shows uncropped
MAX_ASPECT = 1.91  # widest landscape
MAX_BYTES = 8 * 1024 * 1024
JPEG_QUALITIES = (92, 85, 78, 70, 60, 50, 40)
MAX_HASHTAGS = 30
MAX_CAPTION_CHARS = 2200
FINISHED = ("iou_eval", "done")

SELECTION_WEIGHTS = {"judge": 0.35, "ocr": 0.2, "readability": 0.1, "product_clear": 0.15,
                     "image_quality": 0.1, "legibility_margin": 0.1}
# A contrast this many times the required one scores the full legibility margin.
FULL_MARGIN = 2.0
SELECTION_RULE = (
    "among variants done at iou_eval: score = 0.35*vlm_judge overall/10 + 0.2*(0.5*ocr passed + "
    "0.5*(1 - min(1, ocr cer_nospace))) + 0.1*readability passed + 0.15*(product not covered by "
    "text) + 0.1*image quality (planner image_quality: exposure and sharpness of the "
    f"photograph) + 0.1*legibility margin (least legible line's contrast / its required contrast, "
    f"1 -> 0, {FULL_MARGIN:g} or more -> 1); a missing result counts 0; highest score wins, ties go "
    "to the lowest creation_order"
)

_HASHTAG = textlayout.HASHTAG_RE
_WORD = re.compile(r"[^\W\d_]{3,}|[\uac00-\ud7a3]{2,}")
STOPWORDS = frozenset(
    "the and for with you your our are was were this that from have has not but all any can "
    "get now new off its it's into out more most just only very than then them they their".split()
)


# --- choosing the variant -------------------------------------------------------------------------


def _components(results: Mapping[str, Any]) -> dict[str, float]:
    judge = (results.get("vlm_judge") or {}).get("scores") or {}
    ocr = results.get("ocr_eval") or {}
    readability = results.get("readability_eval") or {}
    iou = results.get("iou_eval") or {}
    try:
        overall = min(1.0, max(0.0, float(judge.get("overall", 0)) / 10.0))
    except (TypeError, ValueError):
        overall = 0.0
    ocr_score = 0.5 * bool(ocr.get("passed"))
    try:
        ocr_score += 0.5 * (1.0 - min(1.0, max(0.0, float(ocr.get("cer_nospace", ocr["cer"])))))
    except (KeyError, TypeError, ValueError):
        pass  # no readable error rate: only the pass flag counts
    try:
        quality = min(1.0, max(0.0, float(((results.get("planner") or {}).get("image_quality") or {}).get("score", 0))))
    except (TypeError, ValueError):
        quality = 0.0
    try:
        margin = min(1.0, max(0.0, (float(readability["min_contrast_margin"]) - 1.0) / (FULL_MARGIN - 1.0)))
    except (KeyError, TypeError, ValueError):
        margin = 0.0
    return {
        "judge": overall,
        "ocr": ocr_score,
        "readability": float(bool(readability.get("passed"))),
        "product_clear": float(bool(iou) and not iou.get("product_covered", True)),
        "image_quality": quality,
        "legibility_margin": margin,
    }


def _rank_key(row: Mapping[str, Any]) -> tuple:
    order = row["creation_order"]
    return -row["score"], order if isinstance(order, (int, float)) else math.inf, row["variant_id"]


def rank_variants(variants: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    ranking = []
    for vid, variant in variants.items():
        if (variant.get("current_step"), variant.get("status")) != FINISHED:
            continue
        parts = _components(variant.get("results") or {})
        score = sum(SELECTION_WEIGHTS[k] * v for k, v in parts.items())
        ranking.append(
            {
                "variant_id": vid,
                "score": round(score, 4),
                "creation_order": variant.get("creation_order"),
                "components": {k: round(v, 4) for k, v in parts.items()},
            }
        )
    ranking.sort(key=_rank_key)
    for position, row in enumerate(ranking, 1):
        row["rank"] = position
    return ranking


# --- the image -------------------------------------------------------------------------------------


def _edge_colour(img: Image.Image) -> tuple[int, int, int]:
    arr = np.asarray(img.convert("RGB"))
    edge = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return tuple(int(v) for v in np.median(edge, axis=0))


def compose(img: Image.Image) -> tuple[Image.Image, list[int]]:
    """The image scaled to FEED_WIDTH wide, padded (never cropped) into the allowed aspect ratios.

    Returns the canvas and the padding [left, top, right, bottom] in output pixels.
    """
    width, height = img.size
    shortest = math.ceil(FEED_WIDTH / MAX_ASPECT)
    tallest = math.floor(FEED_WIDTH / MIN_ASPECT)
    out_h = min(tallest, max(shortest, round(FEED_WIDTH * height / width)))
    scale = min(FEED_WIDTH / width, out_h / height)
    new_w = min(FEED_WIDTH, max(1, round(width * scale)))
    new_h = min(out_h, max(1, round(height * scale)))
    resized = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (FEED_WIDTH, out_h), _edge_colour(img))
    left, top = (FEED_WIDTH - new_w) // 2, (out_h - new_h) // 2
    canvas.paste(resized, (left, top))
    return canvas, [left, top, FEED_WIDTH - new_w - left, out_h - new_h - top]


def encode_under(img: Image.Image, max_bytes: int = MAX_BYTES) -> tuple[bytes, int]:
    """JPEG bytes at the highest quality in JPEG_QUALITIES that stays under max_bytes."""
    for quality in JPEG_QUALITIES:
        data = imaging.encode_jpeg(img, quality)
        if len(data) < max_bytes:
            return data, quality
    raise PermanentStageError(
        f"feed image stays over {max_bytes} bytes even at JPEG quality {JPEG_QUALITIES[-1]}"
    )


# --- the caption -----------------------------------------------------------------------------------


def _caption_line(text: Any) -> str:
    """NFC, one space between words, no control or format characters except inside emoji, which the
    shared policy keeps whole in the caption (a ZWJ family, a subdivision flag)."""
    text = unicodedata.normalize("NFC", str(text or ""))
    text, _ = textlayout.apply_emoji_policy(text, "caption")
    inside = {i for a, b in textlayout.emoji_spans(text) for i in range(a, b)}
    text = "".join(
        ch for i, ch in enumerate(text) if i in inside or not unicodedata.category(ch).startswith("C") or ch in "\n\t"
    )
    return re.sub(r"\s+", " ", text).strip()


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)].rstrip() + "…"


def _split_tags(line: str) -> tuple[str, list[str]]:
    """(the line without its standalone hashtag runs, those tags): they go to the caption's tag block."""
    pieces, tags, last = [], [], 0
    for a, b, standalone in textlayout.hashtag_runs(line):
        if standalone:
            pieces.append(line[last:a])
            tags.extend(textlayout.hashtags(line[a:b]))
            last = b
    pieces.append(line[last:])
    return re.sub(r"\s+", " ", "".join(pieces)).strip(), tags


def _dedupe_inline(text: str, seen: set[str], allowed: int) -> str:
    """Inline tags after their first use anywhere in the caption, or past the limit, lose their '#'."""

    def keep(match: re.Match) -> str:
        tag = match.group(0).lower()
        if tag in seen or len(seen) >= allowed:
            return match.group(1)
        seen.add(tag)
        return match.group(0)

    return textlayout.HASHTAG_RE.sub(keep, text)


def _derived_tags(english: str, korean: str, subject: str) -> list[str]:
    tags = []
    subject_words = _WORD.findall(subject)
    if len(subject_words) > 1:
        tags.append("".join(w.lower() for w in subject_words))
    for word in (
        subject_words + _WORD.findall(_HASHTAG.sub(" ", english)) + _WORD.findall(_HASHTAG.sub(" ", korean))
    ):
        if word.lower() not in STOPWORDS:
            tags.append(word.lower())
    return tags


def build_caption(korean: str, english: str, subject: str = "") -> tuple[str, list[str]]:
    """(caption, every hashtag in it): Korean line, English line, then one block of hashtags.

    Each hashtag appears once, compared case-insensitively (the first spelling wins): a tag the
    Korean line already carries is not repeated from the English one. Standalone tag runs move to the
    block; a tag used as a word in a sentence stays there. The copy's own tags come before derived
    ones, and derived ones are the first to go when a limit is reached. Emoji stay (textlayout's
    emoji policy); all limits are met.
    """
    korean, korean_tags = _split_tags(_caption_line(korean))
    english, english_tags = _split_tags(_caption_line(english))
    seen: set[str] = set()
    korean = _dedupe_inline(korean, seen, MAX_HASHTAGS)
    english = _dedupe_inline(english, seen, MAX_HASHTAGS)
    own: list[str] = []
    for tag in korean_tags + english_tags:
        if tag.lower() not in seen and len(seen) < MAX_HASHTAGS:
            seen.add(tag.lower())
            own.append(tag)
    added: list[str] = []
    for word in _derived_tags(english, korean, _caption_line(subject)):
        tag = f"#{word}"
        if len(seen) >= MAX_HASHTAGS:
            break
        if tag.lower() not in seen:
            seen.add(tag.lower())
            added.append(tag)

    def assemble() -> str:
        body = "\n".join(line for line in (korean, english) if line)
        block = " ".join(own + added)
        return f"{body}\n\n{block}" if block and body else body or block

    while len(assemble()) > MAX_CAPTION_CHARS and added:
        added.pop()
    block = len(" ".join(own)) + 2 if own else 0
    if len(korean) + 1 + len(english) + block > MAX_CAPTION_CHARS:
        # Copy this long is an upstream fault; keep both languages, Korean first in the budget.
        budget = MAX_CAPTION_CHARS - block
        half = (budget - 1) // 2
        korean = _truncate(korean, max(half, budget - 1 - len(english)))
        english = _truncate(english, budget - 1 - len(korean))
    caption = assemble()
    return caption, textlayout.hashtags(caption)


# --- the stage -------------------------------------------------------------------------------------


def run(inp: StageInput) -> StageOutput:
    korean = (inp.results.get("ad_copy_gen_kor") or {}).get("korean")
    if not isinstance(korean, str) or not korean.strip():
        raise PermanentStageError("the Korean copy from ad_copy_gen_kor is missing or empty")
    ranking = rank_variants(inp.variants)
    if not ranking:
        states = {vid: f"{v.get('current_step')}/{v.get('status')}" for vid, v in inp.variants.items()}
        raise PermanentStageError(
            f"no variant finished the pipeline (done at iou_eval); variants: {states or 'none'}",
            {"variants": states},
        )
    chosen = ranking[0]["variant_id"]
    results = inp.variants[chosen].get("results") or {}
    overlay = imaging.artifact_image(
        inp.read_artifact, results.get("overlay"), "overlay.png", f"variant {chosen}'s overlay"
    )
    canvas, padding = compose(overlay)
    jpeg, quality = encode_under(canvas)

    subject = (results.get("vlm_analyze") or {}).get("main_subject") or ""
    caption, hashtags = build_caption(korean, inp.ad_copy, str(subject))

    image = {
        "width": canvas.width,
        "height": canvas.height,
        "format": "JPEG",
        "color_space": "sRGB",
        "bytes": len(jpeg),
        "quality": quality,
        "padding": padding,
    }
    bundle = {"chosen_variant_id": chosen, "caption": caption, "hashtags": hashtags, "image": image}
    return StageOutput(
        result={
            "chosen_variant_id": chosen,
            "selection_rule": SELECTION_RULE,
            "ranking": ranking,
            "caption": caption,
            "hashtags": hashtags,
            "image": image,
        },
        artifacts={
            "post.jpg": jpeg,
            "post.json": json.dumps(bundle, ensure_ascii=False, indent=2).encode("utf-8"),
        },
    )
