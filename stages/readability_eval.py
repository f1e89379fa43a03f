"""readability_eval stage: WCAG contrast, text size and background busyness of each rendered line.

The background of a line is the overlay's own pixels around the line minus the ink. Ink is found by
comparing the overlay with what the overlay stage drew the text onto (the original image, with the
recorded scrim laid over it): a background pixel that happens to have the text colour stays
background, so it lowers the contrast as it should instead of being mistaken for text.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from PIL import Image

from stages import imaging, saliency
from stages.boxes import parse_box, read_text_boxes
from stages.contract import PermanentStageError, StageInput, StageOutput

THRESHOLDS = {
    "min_contrast_normal": imaging.WCAG_AA_NORMAL,
    "min_contrast_large": imaging.WCAG_AA_LARGE,
    # Font size / image height at which text counts as WCAG "large" (14 pt bold ~ 18.7 CSS px) when
    # the image fills a phone feed of about 375 CSS px: 18.7 / 375 ~ 0.05.
    "large_text_height_ratio": 0.05,
    "min_text_height_ratio": 0.025,
    "max_busyness": saliency.MAX_BUSYNESS,  # share of background pixels on a visible edge
}
BACKGROUND_MARGIN = 0.25  # background taken this far around the ink box, in ink heights
INK_TOLERANCE = 12  # a channel differing more than this from the drawn-on image is ink
MIN_BACKGROUND_SHARE = 0.10  # below this, the around-ink sample is too thin to trust


def _drawn_on(inp: StageInput, overlay: Mapping[str, Any], size: tuple[int, int]) -> Image.Image:
    """The image the overlay stage drew text onto: the original plus its scrim, if any."""
    base = imaging.load_image(inp.image)
    if base.size != size:
        raise PermanentStageError(
            f"overlay image is {size[0]}x{size[1]} but the original is {base.size[0]}x{base.size[1]}"
        )
    if overlay.get("scrim"):
        try:
            box = parse_box(overlay["scrim_box"], "overlay scrim")
            colour = imaging.parse_colour(overlay["scrim_color"], "overlay scrim_color")
            alpha = float(overlay["scrim_alpha"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentStageError(f"overlay result records a scrim without its geometry: {exc}") from None
        base = imaging.blend_box(base, box, colour, alpha)
    return base


def _background(rendered: np.ndarray, drawn_on: np.ndarray) -> tuple[np.ndarray, str]:
    """Background pixels of a region (RGB rows) and where they came from."""
    ink = np.abs(rendered - drawn_on).max(axis=2) > INK_TOLERANCE
    grown = ink.copy()  # one pixel of growth drops the anti-aliased fringe
    grown[1:, :] |= ink[:-1, :]
    grown[:-1, :] |= ink[1:, :]
    grown[:, 1:] |= ink[:, :-1]
    grown[:, :-1] |= ink[:, 1:]
    keep = ~grown
    if keep.mean() >= MIN_BACKGROUND_SHARE:
        return rendered[keep], "overlay minus ink"
    return drawn_on.reshape(-1, 3), "original under the text"


def measure_box(
    rendered: Image.Image, drawn_on: Image.Image, box, text_rgb, text_height: float
) -> dict[str, Any]:
    width, height = rendered.size
    x1, y1, x2, y2 = box
    m = BACKGROUND_MARGIN * max(1.0, y2 - y1)
    region = (
        max(0, int(np.floor(x1 - m))),
        max(0, int(np.floor(y1 - m))),
        min(width, int(np.ceil(x2 + m))),
        min(height, int(np.ceil(y2 + m))),
    )
    rendered_px = imaging.rgb_array(rendered.crop(region))
    drawn_px = imaging.rgb_array(drawn_on.crop(region))
    background, source = _background(rendered_px, drawn_px)
    contrast = imaging.worst_contrast(text_rgb, imaging.relative_luminance(background))
    ratio = text_height / height
    large = ratio >= THRESHOLDS["large_text_height_ratio"]
    required = THRESHOLDS["min_contrast_large" if large else "min_contrast_normal"]
    busyness = saliency.edge_density(imaging.grey_array(drawn_on.crop(region)))
    checks = {
        "contrast": contrast >= required,
        "text_height": ratio >= THRESHOLDS["min_text_height_ratio"],
        "busyness": busyness <= THRESHOLDS["max_busyness"],
    }
    return {
        "contrast": round(contrast, 3),
        "required_contrast": required,
        "large_text": large,
        "text_height_ratio": round(ratio, 4),
        "busyness": round(busyness, 4),
        "background_source": source,
        "checks": checks,
        "passed": all(checks.values()),
    }


def run(inp: StageInput) -> StageOutput:
    overlay = inp.results.get("overlay")
    lines = read_text_boxes(overlay, "there is no rendered text to measure")
    rendered = imaging.artifact_image(inp.read_artifact, overlay, "overlay.png", "overlay")
    drawn_on = _drawn_on(inp, overlay, rendered.size)
    text_rgb = imaging.parse_colour(overlay.get("text_color", "#000000"), "overlay text_color")

    rows = []
    for line in lines:
        # The em size is the text height readers judge by; without it, the ink height stands in.
        text_height = float(overlay.get("font_size") or (line.box[3] - line.box[1]))
        row = measure_box(rendered, drawn_on, line.box, text_rgb, text_height)
        rows.append({"text": line.text, "box": list(line.box), **row})
    return StageOutput(
        result={
            "overlay_id": overlay.get("overlay_id"),
            "boxes": rows,
            "min_contrast": min(r["contrast"] for r in rows),
            "max_busyness": max(r["busyness"] for r in rows),
            "thresholds": dict(THRESHOLDS),
            "contrast_rule": "WCAG 2.x ratio against the 10% of background pixels closest in "
            "luminance to the text colour",
            "passed": all(r["passed"] for r in rows),
        }
    )
