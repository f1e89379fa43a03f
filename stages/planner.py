"""planner stage: proposes where and how the ad copy goes on the image, and picks one proposal.

Candidate regions (bands, corners, sides, centre) each get the largest font size at which the
wrapped copy fits, then a score: avoid detected objects (the product above all), avoid salient and
busy areas, prefer high contrast and large text. The copy is never placed outside the image: if it
cannot fit anywhere at the minimum legible size, the stage refuses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from stages import fonts, imaging, saliency, textlayout
from stages.boxes import Detection, area, intersection, read_detections
from stages.contract import PermanentStageError, StageInput, StageOutput

MIN_FONT_RATIO = 0.03  # of the image height: smaller copy is not legible in a phone feed
MIN_FONT_PX = 12
MAX_FONT_RATIO = 0.12
MARGIN_RATIO = 0.04  # keeps text off the image edge, where feeds crop and round corners
ANALYSIS_MAX_SIDE = 512  # scores are averages over boxes: a thumbnail measures them well enough
PALETTE_SIZE = 3
PALETTE_MIN_CONTRAST = 7.0  # an image colour replaces black/white only when it reaches WCAG AAA
CONTRAST_CAP = 7.0
PRODUCT_WEIGHT = 1.0
OBJECT_WEIGHT = 0.4
WEIGHTS = {"object_overlap": 3.0, "saliency": 1.0, "busyness": 1.0, "contrast": 0.5, "size": 0.5}
SCORING_RULE = (
    "score = 1 - 3*object_overlap - saliency - busyness + 0.5*min(contrast,7)/7 + 0.5*size, where "
    "object_overlap = max over detections of weight*intersection/min(box area, object area) "
    "(weight 1.0 product, 0.4 other objects), saliency = mean spectral-residual saliency in the "
    "box, busyness = edge density in the box, contrast = WCAG ratio of the text colour against the "
    "10% of background pixels closest to it, size = font size / largest allowed size; proposals "
    "touching the product rank after all that do not; ties keep the earlier proposal"
)

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Region:
    name: str
    frac: tuple[float, float, float, float]  # of the area inside the margins
    halign: str  # left / center / right
    valign: str  # top / center / bottom


REGIONS = (
    Region("top", (0.0, 0.0, 1.0, 0.25), "center", "top"),
    Region("top_tall", (0.0, 0.0, 1.0, 0.38), "center", "top"),
    Region("bottom", (0.0, 0.75, 1.0, 1.0), "center", "bottom"),
    Region("bottom_tall", (0.0, 0.62, 1.0, 1.0), "center", "bottom"),
    Region("top_left", (0.0, 0.0, 0.55, 0.38), "left", "top"),
    Region("top_right", (0.45, 0.0, 1.0, 0.38), "right", "top"),
    Region("bottom_left", (0.0, 0.62, 0.55, 1.0), "left", "bottom"),
    Region("bottom_right", (0.45, 0.62, 1.0, 1.0), "right", "bottom"),
    Region("left", (0.0, 0.2, 0.5, 0.8), "left", "center"),
    Region("right", (0.5, 0.2, 1.0, 0.8), "right", "center"),
    Region("center", (0.1, 0.3, 0.9, 0.7), "center", "center"),
)
# Only tried when no region above can hold the copy: the whole image inside the margins.
FALLBACK_REGION = Region("full", (0.0, 0.0, 1.0, 1.0), "center", "center")


@dataclass(frozen=True)
class Fit:
    region: Region
    font_size: int
    lines: list[str]
    box: tuple[int, int, int, int]


class _Maps:
    """Per-pixel maps of a thumbnail, with integrals for fast box means."""

    def __init__(self, img: Image.Image):
        self.scale = min(1.0, ANALYSIS_MAX_SIDE / max(img.size))
        size = (max(1, round(img.width * self.scale)), max(1, round(img.height * self.scale)))
        thumb = img.resize(size, Image.Resampling.BILINEAR) if self.scale < 1.0 else img
        grey = imaging.grey_array(thumb)
        self.luminance = imaging.relative_luminance(imaging.rgb_array(thumb))
        self.saliency = saliency.integral_image(saliency.spectral_residual(grey))
        self.edges = saliency.integral_image(saliency.edge_map(grey))
        self.palette = _palette(thumb)

    def cell(self, box: Sequence[int]) -> tuple[int, int, int, int]:
        h, w = self.luminance.shape
        x1 = min(w - 1, max(0, int(box[0] * self.scale)))
        y1 = min(h - 1, max(0, int(box[1] * self.scale)))
        x2 = min(w, max(x1 + 1, int(np.ceil(box[2] * self.scale))))
        y2 = min(h, max(y1 + 1, int(np.ceil(box[3] * self.scale))))
        return x1, y1, x2, y2


def _palette(img: Image.Image) -> list[tuple[int, int, int]]:
    quantised = img.quantize(colors=PALETTE_SIZE, method=Image.Quantize.MEDIANCUT)
    raw = quantised.getpalette() or []
    counts = sorted(quantised.getcolors() or [], reverse=True)
    return [tuple(raw[3 * idx : 3 * idx + 3]) for _, idx in counts]  # most frequent first


def _font_bounds(height: int) -> tuple[int, int]:
    smallest = max(MIN_FONT_PX, int(round(height * MIN_FONT_RATIO)))
    largest = max(smallest, int(round(height * MAX_FONT_RATIO)))
    return smallest, largest


def _region_rect(region: Region, size: tuple[int, int]) -> tuple[int, int, int, int]:
    width, height = size
    margin = int(round(min(width, height) * MARGIN_RATIO))
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    fx1, fy1, fx2, fy2 = region.frac
    return (
        margin + int(round(fx1 * inner_w)),
        margin + int(round(fy1 * inner_h)),
        margin + int(round(fx2 * inner_w)),
        margin + int(round(fy2 * inner_h)),
    )


def _layout_at(text: str, size: int, rect: Sequence[int]) -> tuple[list[str], tuple[int, int]] | None:
    font = fonts.load_font(size)
    pad = textlayout.padding(size)
    lines = textlayout.wrap_text(text, font, (rect[2] - rect[0]) - 2 * pad)
    if not lines:
        return None
    box_w, box_h = textlayout.box_size(lines, font)
    if box_w > rect[2] - rect[0] or box_h > rect[3] - rect[1]:
        return None
    return lines, (box_w, box_h)


def _fit(text: str, region: Region, size: tuple[int, int]) -> Fit | None:
    """Largest font size at which the copy fits the region, placed at the region's anchor."""
    rect = _region_rect(region, size)
    smallest, largest = _font_bounds(size[1])
    best = _layout_at(text, smallest, rect)
    if best is None:
        return None
    best_size = smallest
    lo, hi = smallest + 1, largest
    while lo <= hi:
        mid = (lo + hi) // 2
        layout = _layout_at(text, mid, rect)
        if layout is None:
            hi = mid - 1
        else:
            best, best_size, lo = layout, mid, mid + 1
    lines, (box_w, box_h) = best
    x1 = {"left": rect[0], "right": rect[2] - box_w}.get(region.halign, (rect[0] + rect[2] - box_w) // 2)
    y1 = {"top": rect[1], "bottom": rect[3] - box_h}.get(region.valign, (rect[1] + rect[3] - box_h) // 2)
    return Fit(region, best_size, lines, (x1, y1, x1 + box_w, y1 + box_h))


def _overlaps(box: Sequence[int], detections: Sequence[Detection]) -> tuple[float, float]:
    """(weighted object overlap, product overlap), each a share in [0, 1]."""
    weighted = product = 0.0
    for det in detections:
        smaller = min(area(box), area(det.box))
        inter = intersection(box, det.box)
        if inter is None or smaller <= 0:
            continue
        share = min(1.0, area(inter) / smaller)
        weighted = max(weighted, share * (PRODUCT_WEIGHT if det.is_product else OBJECT_WEIGHT))
        if det.is_product:
            product = max(product, share)
    return weighted, product


def _pick_colour(maps: _Maps, cell: tuple[int, int, int, int]) -> tuple[tuple[int, int, int], float]:
    x1, y1, x2, y2 = cell
    background = maps.luminance[y1:y2, x1:x2]
    palette = [(c, imaging.worst_contrast(c, background)) for c in maps.palette]
    strong = [pc for pc in palette if pc[1] >= PALETTE_MIN_CONTRAST]
    if strong:
        return max(strong, key=lambda pc: pc[1])
    mono = [(c, imaging.worst_contrast(c, background)) for c in (BLACK, WHITE)]
    return max(mono, key=lambda pc: pc[1])


def _propose(fit: Fit, maps: _Maps, detections: Sequence[Detection], largest: int) -> dict:
    cell = maps.cell(fit.box)
    colour, contrast = _pick_colour(maps, cell)
    object_overlap, product_overlap = _overlaps(fit.box, detections)
    scores = {
        "object_overlap": object_overlap,
        "product_overlap": product_overlap,
        "saliency": saliency.box_mean(maps.saliency, cell),
        "busyness": saliency.box_mean(maps.edges, cell),
        "contrast": contrast,
        "size": fit.font_size / largest,
    }
    score = (
        1.0
        - WEIGHTS["object_overlap"] * scores["object_overlap"]
        - WEIGHTS["saliency"] * scores["saliency"]
        - WEIGHTS["busyness"] * scores["busyness"]
        + WEIGHTS["contrast"] * min(contrast, CONTRAST_CAP) / CONTRAST_CAP
        + WEIGHTS["size"] * scores["size"]
    )
    return {
        "region": fit.region.name,
        "box": list(fit.box),
        "align": fit.region.halign,
        "font_size": fit.font_size,
        "color": imaging.rgb_to_hex(colour),
        "lines": fit.lines,
        "scores": {k: round(float(v), 4) for k, v in scores.items()},
        "score": round(float(score), 4),
    }


def plan(img: Image.Image, copy: str, detections: Sequence[Detection]) -> list[dict]:
    """All proposals for the cleaned copy, in candidate order, ids p0, p1, ..."""
    size = img.size
    fits = [f for f in (_fit(copy, region, size) for region in REGIONS) if f is not None]
    if not fits:
        fallback = _fit(copy, FALLBACK_REGION, size)
        if fallback is None:
            smallest, _ = _font_bounds(size[1])
            raise PermanentStageError(
                f"ad copy too long for the image: {len(copy)} characters do not fit at the minimum "
                f"legible font size of {smallest} px ({MIN_FONT_RATIO:.0%} of the image height) in a "
                f"{size[0]}x{size[1]} image",
                {"characters": len(copy), "min_font_size": smallest, "image_size": list(size)},
            )
        fits = [fallback]
    unique: dict[tuple, Fit] = {}
    for fit in fits:  # regions that end up with the same box and size are one proposal
        unique.setdefault((fit.box, fit.font_size, fit.region.halign), fit)
    fits = list(unique.values())
    maps = _Maps(img)
    _, largest = _font_bounds(size[1])
    proposals = [_propose(fit, maps, detections, largest) for fit in fits]
    for i, proposal in enumerate(proposals):
        proposal["proposal_id"] = f"p{i}"
    return proposals


def choose(proposals: Sequence[dict]) -> dict:
    return min(
        enumerate(proposals),
        key=lambda ip: (ip[1]["scores"]["product_overlap"] > 0, -ip[1]["score"], ip[0]),
    )[1]


def run(inp: StageInput) -> StageOutput:
    img = imaging.load_image(inp.image)
    copy, dropped = fonts.clean_text_report(inp.ad_copy)
    if not copy:
        raise PermanentStageError(
            "ad copy is empty after cleaning (nothing renderable is left)",
            {"dropped": dropped[:50]},
        )
    detections = read_detections(inp.results.get("yolo_detect"), img.size)
    proposals = plan(img, copy, detections)
    chosen = choose(proposals)
    return StageOutput(
        result={
            "text": copy,
            "dropped_characters": "".join(dropped),
            "lines": chosen["lines"],
            "image_size": list(img.size),
            "font": os.path.basename(fonts.font_path()),
            "proposals": proposals,
            "proposal_id": chosen["proposal_id"],
            "scoring": SCORING_RULE,
        }
    )
