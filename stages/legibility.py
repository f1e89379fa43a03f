"""The one legibility measure: overlay decides on a scrim or backing with it, readability_eval checks with it.

A line is legible when (1) the text colour reaches the required WCAG ratio against all but the worst
10% of the background pixels around the line, (2) at most 1% of the pixels right next to the
glyphs fall below that ratio (a thin dark ring around white text fails here even when the wider
surround is fine), (3) the background is calm enough, and (4) the text is at least 14 CSS px when
the post is shown on a 375 px wide phone. "Large" text (the 3:1 ratio) is judged in those phone CSS
px too, not as a share of the image height.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from stages import imaging, saliency

# The feed post's geometry (instagram_feed_gen.compose): the image is scaled into a 1080 px wide
# canvas whose aspect lies between 4:5 and 1.91:1, so a tall image is shown narrower than 1080.
FEED_WIDTH = 1080
FEED_MIN_ASPECT = 4 / 5
FEED_MAX_ASPECT = 1.91
PHONE_CSS_WIDTH = 375  # the post as a phone feed shows it
MIN_CSS_PX = 14.0
# WCAG 2.x "large text": 18 pt, or 14 pt bold; 1 pt = 4/3 CSS px.
LARGE_CSS_PX = 24.0
LARGE_BOLD_CSS_PX = 14 * 4 / 3
MAX_ADJACENT_BELOW = 0.01  # share of glyph-adjacent pixels allowed under the required ratio
ADJACENT_EM = 0.12  # width of the glyph-adjacent ring, in ems (a stroke width or so)
BACKGROUND_MARGIN = 0.25  # background taken this far around the ink box, in ink heights
INK_TOLERANCE = 12  # a channel differing more than this from the drawn-on image is ink
MIN_BACKGROUND_SHARE = 0.10  # below this, the around-ink sample is too thin to trust

RULE = (
    "legible when, for every line: worst-10% WCAG contrast of the text colour against the "
    "background around the line >= required; share of pixels within ~0.12 em of the glyphs below "
    "the required ratio <= 1%; background edge density <= max_busyness; size >= 14 CSS px on a "
    "375 px wide phone; required = 3.0 for large text (>= 18.67 CSS px bold, >= 24 CSS px "
    "regular), else 4.5"
)


def display_scale(image_size: Sequence[int]) -> float:
    """CSS px on the phone per image px, through the feed composition's scaling."""
    width, height = (float(v) for v in image_size)
    shortest = math.ceil(FEED_WIDTH / FEED_MAX_ASPECT)
    tallest = math.floor(FEED_WIDTH / FEED_MIN_ASPECT)
    out_h = min(tallest, max(shortest, round(FEED_WIDTH * height / width)))
    scale = min(FEED_WIDTH / width, out_h / height)
    return scale * PHONE_CSS_WIDTH / FEED_WIDTH


def css_px(image_px: float, image_size: Sequence[int]) -> float:
    return float(image_px) * display_scale(image_size)


# Headroom over the exact floor, in image px. The rasteriser's hinting snaps glyph heights to whole
# pixels, so a size less than half a pixel above the exact floor can draw glyphs as tall as the size
# below it: NanumGothic Bold at 48 px draws "H" 35 px tall, as at 47 px, on a 1280x720 photo whose
# floor is 47.8 px (bench/creative_quality.py measures the drawn ink and read such lines as 13.9 CSS px).
FLOOR_HEADROOM_PX = 0.5


def min_font_px(image_size: Sequence[int]) -> int:
    """The smallest em size in image px whose glyphs still show at MIN_CSS_PX on the phone."""
    return max(1, int(math.ceil(MIN_CSS_PX / display_scale(image_size) + FLOOR_HEADROOM_PX - 1e-9)))


def is_bold(font_path: str) -> bool:
    name = os.path.basename(font_path).lower()
    return "bold" in name or name.endswith(("b.ttf", "b.otf")) or "heavy" in name or "black" in name


def required_contrast(font_css_px: float, bold: bool) -> float:
    large = font_css_px >= (LARGE_BOLD_CSS_PX if bold else LARGE_CSS_PX)
    return imaging.WCAG_AA_LARGE if large else imaging.WCAG_AA_NORMAL


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:, :] |= out[:-1, :]
        grown[:-1, :] |= out[1:, :]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def line_region(ink_box: Sequence[float], image_size: Sequence[int], limits: Sequence[float] | None = None):
    """Where a line's background is sampled: its ink box plus a margin, inside the text block.

    Kept inside the block (where a scrim or backing lies) so the area a scrim can fix is the area
    that is judged.
    """
    width, height = image_size
    x1, y1, x2, y2 = ink_box
    m = BACKGROUND_MARGIN * max(1.0, y2 - y1)
    lx1, ly1, lx2, ly2 = limits if limits is not None else (0, 0, width, height)
    left, top = max(lx1, x1 - m), max(ly1, y1 - m)
    right, bottom = min(lx2, x2 + m), min(ly2, y2 + m)
    left, top, right, bottom = min(left, x1), min(top, y1), max(right, x2), max(bottom, y2)
    return (
        max(0, int(math.floor(left))),
        max(0, int(math.floor(top))),
        min(int(width), int(math.ceil(right))),
        min(int(height), int(math.ceil(bottom))),
    )


def measure_line(
    rendered: np.ndarray,
    drawn_on: np.ndarray,
    ink_box: Sequence[float],
    text_rgb: Sequence[int],
    font_px: float,
    image_size: Sequence[int],
    bold: bool = True,
    limits: Sequence[float] | None = None,
    origin: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """Legibility of one drawn line.

    rendered: the image with the text (H x W x 3 floats); drawn_on: the same image before the text
    was drawn (original plus scrim or backing). Ink is where they differ, so a background pixel that
    happens to have the text colour stays background and lowers the contrast, as it should. Both
    arrays may be a crop whose top-left lies at `origin` in the image; boxes are in image pixels and
    the crop must hold the line's region (inside `limits`, the text block, that is the block).
    """
    x1, y1, x2, y2 = line_region(ink_box, image_size, limits)
    ox, oy = origin
    rendered_px = rendered[y1 - oy : y2 - oy, x1 - ox : x2 - ox]
    drawn_px = drawn_on[y1 - oy : y2 - oy, x1 - ox : x2 - ox]
    ink = np.abs(rendered_px - drawn_px).max(axis=2) > INK_TOLERANCE
    grown = _grow(ink, 1)  # one pixel of growth drops the anti-aliased fringe
    keep = ~grown
    if keep.mean() >= MIN_BACKGROUND_SHARE:
        background, source = rendered_px[keep], "overlay minus ink"
    else:
        background, source = drawn_px.reshape(-1, 3), "original under the text"
    text_lum = imaging.relative_luminance(text_rgb)
    contrast = imaging.worst_contrast(text_rgb, imaging.relative_luminance(background))
    size_css = css_px(font_px, image_size)
    required = required_contrast(size_css, bold)
    ring_steps = max(2, int(round(ADJACENT_EM * font_px)))
    ring = _grow(ink, ring_steps) & ~grown
    if ring.any():
        ring_lum = imaging.relative_luminance(drawn_px[ring])
        adjacent_below = float(np.mean(np.asarray(imaging.contrast_ratio(text_lum, ring_lum)) < required))
    else:
        adjacent_below = 0.0
    busyness = saliency.edge_density(imaging.luma(drawn_px))
    checks = {
        "contrast": contrast >= required,
        "adjacent": adjacent_below <= MAX_ADJACENT_BELOW,
        "busyness": busyness <= saliency.MAX_BUSYNESS,
        "text_size": size_css >= MIN_CSS_PX - 1e-9,
    }
    return {
        "contrast": round(contrast, 3),
        "required_contrast": required,
        "adjacent_below_share": round(adjacent_below, 4),
        "large_text": required == imaging.WCAG_AA_LARGE,
        "css_px": round(size_css, 2),
        "busyness": round(busyness, 4),
        "background_source": source,
        "checks": checks,
        "passed": all(checks.values()),
    }


def thresholds() -> dict[str, float]:
    return {
        "min_contrast_normal": imaging.WCAG_AA_NORMAL,
        "min_contrast_large": imaging.WCAG_AA_LARGE,
        "large_text_css_px_bold": round(LARGE_BOLD_CSS_PX, 2),
        "large_text_css_px": LARGE_CSS_PX,
        "min_text_css_px": MIN_CSS_PX,
        "phone_css_width": PHONE_CSS_WIDTH,
        "max_adjacent_below_share": MAX_ADJACENT_BELOW,
        "max_busyness": saliency.MAX_BUSYNESS,
    }
