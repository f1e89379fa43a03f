"""planner stage: searches for where and how the ad copy goes on the image, and picks one placement.

Placement is a search, not a menu. Candidate text blocks cover the whole image: every position on
a grid inside the safe margins x font sizes (from large down to the legibility floor) x line counts
(wrap widths); the alignment follows the block's side of the image. Hard constraints come first and
are exact: the block lies inside the safe margins, covers at most MAX_BLOCK_SHARE of the image, and
touches no detected object's box, no face and no person (faces, the persons under them and, where no
detector with real weights ran, people segmented by stages/people.py are found here). Survivors are
scored on saliency, the subject map, busyness, contrast, size and balance with the subject.

When nothing fits, a fallback ladder, each rung recorded in the result's "fallback":
  1. smaller type, down to the floor (the smallest text MIN_CSS_PX on a 375 px wide phone);
  2. "headline": the first sentence (or clause, or words) on the image, the rest in the caption
     ("caption_text" in the result, for the feed stage to carry);
  3. "extend": the canvas grows by a band above or below the photo, in the colour of the photo's
     edge it continues, and the copy (or its headline) goes there: the photo itself is not
     covered at all (a portrait that fills its frame, a crowded scene). Every stage after the
     planner reads the overlay's "canvas" to know where the photo sits;
  4. "band": a full-width band with a backing over the top or bottom edge of the photo (never
     over a face), where even an extension cannot hold the copy within MAX_BLOCK_SHARE;
  5. a PermanentStageError for this variant that says why. Copy length alone never fails a job.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from stages import fonts, image_quality, imaging, legibility, people as people_finder, saliency, textlayout
from stages.boxes import Detection, area, intersection, read_detections
from stages.contract import PermanentStageError, StageInput, StageOutput

MAX_FONT_RATIO = 0.12  # of the image height: larger copy shouts over the picture
MARGIN_RATIO = 0.04  # of the shorter side: keeps text off the edge, where feeds crop and round corners
MAX_BLOCK_SHARE = 0.25  # the text block's area over the image's
CLEARANCE_RATIO = 0.01  # of the shorter side: air kept between the block and any object or face
FACE_CLEARANCE = 0.15  # of the face's size: the block keeps off hair and chin too
ANALYSIS_MAX_SIDE = 384  # scores are box means: a thumbnail measures them well enough
CONSTRAINT_MAX_SIDE = 512  # the hard-constraint mask: boxes are rounded outwards (a cell is 2 px at 1000 px), so it never misses
SIZE_STEP = 1.18  # ratio between successive candidate font sizes
WRAP_FRACTIONS = (1.0, 0.8, 0.62, 0.48, 0.36)  # wrap widths, as shares of the widest allowed line
GRID_STEPS = 40  # positions per image side on the search grid
CONTRAST_SHORTLIST = 60  # candidates whose text colour and contrast are measured exactly
PROPOSALS = 8  # distinct placements kept in the result
DISTINCT_IOU = 0.5  # proposals overlapping more than this are one placement
PALETTE_SIZE = 3
PALETTE_MIN_CONTRAST = 7.0  # an image colour replaces black/white only when it reaches WCAG AAA
CONTRAST_CAP = 7.0
MAX_LINES = 4  # more lines than this on a post is a paragraph, not ad copy: the caption takes it
MAX_HEADLINE_CHARS = 70  # a headline is read at a glance
# Fewer words than this say nothing on their own ("Summer" of a summer sale): the extension
# band with the whole copy is the better next rung.
MIN_HEADLINE_WORDS = 3
CENTRE_PRIOR = 0.5  # photographers centre their subject: the middle counts as subject this much
CENTRE_SIGMA = 0.25  # of each side
WEIGHTS = {
    "saliency": 1.0, "subject": 1.5, "busyness": 1.0, "contrast": 0.5, "size": 0.8, "balance": 0.3,
    "block_share": 0.5, "extra_lines": 0.05, "salient_share": 2.0,
}
SALIENT_LEVEL = 0.2  # spectral-residual saliency above this marks something a viewer looks at
SCORING_RULE = (
    "hard constraints first: inside the safe margins (4% of the shorter side), block <= 25% of the "
    "image, no overlap with any detected object, face or person (faces by dlib HOG, a person "
    "estimated under each face, and without a detector with real weights the box of each region of "
    "MediaPipe's selfie segmentation), text >= 14 CSS px on a 375 px phone; then score = 1 - saliency - "
    "1.5*subject - busyness + 0.5*min(contrast,7)/7 + 0.8*size + 0.3*balance - 0.5*block_share - "
    "0.05*(lines beyond 2) - 2*salient_share, at most 4 lines, where salient_share = share of the "
    "block where spectral-residual saliency > 0.2, saliency = mean spectral-residual saliency in the "
    "box, subject = mean of the face/person/object map with a centre prior, busyness = "
    "edge density, contrast = WCAG ratio of the text colour against the 10% of background pixels "
    "closest to it, size = font size / largest size, balance = 1 - distance between the image centre "
    "and the midpoint of text and subject centres (as a share of the half diagonal); fallbacks: "
    "smaller type to the floor, then headline on the image with the rest in the caption, then the "
    "canvas extended by a band above or below the photo in its edge's colour, holding the copy or its "
    "headline (extension score = 0.8*size + 0.3*(1 - busyness of the photo's edge it continues)), "
    "then a full-width band with a backing over the top or bottom edge, never over a face (band "
    "score = 1 - 2*share of the subject map under the band + 0.8*size), then a per-variant error"
)

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
EXTEND_EDGE = 0.05  # share of the photo's height at the edge whose colour an extension continues
EXTEND_BUSYNESS_WEIGHT = 0.3  # a calm edge joins its band without a seam
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:，、])\s+|\s+[-–—|]\s+")


@dataclass(frozen=True)
class Layout:
    font_size: int
    lines: list[str]
    size: tuple[int, int]  # box width, height (padding included)


@dataclass(frozen=True)
class Candidate:
    box: tuple[int, int, int, int]
    layout: Layout
    align: str
    region: str
    prescore: float
    terms: dict


class _Maps:
    """Per-pixel maps of a thumbnail, with integrals for fast box means."""

    def __init__(self, img: Image.Image, subject: np.ndarray):
        thumb, self.scale = imaging.downscaled(img, ANALYSIS_MAX_SIDE)
        size = thumb.size
        grey = imaging.grey_array(thumb)
        self.rgb = imaging.rgb_array(thumb)
        self.luminance = imaging.relative_luminance(self.rgb)
        self.saliency_map = saliency.spectral_residual(grey)
        self.saliency = saliency.integral_image(self.saliency_map)
        # The share of a block over salient things: a mean would let a small salient object hide
        # inside a large calm block.
        self.salient = saliency.integral_image((self.saliency_map > SALIENT_LEVEL).astype(np.float64))
        self.edges = saliency.integral_image(saliency.edge_map(grey))
        self.subject = saliency.integral_image(subject if subject.shape == (size[1], size[0]) else saliency.resize_map(subject, size))
        self.palette = _palette(thumb)
        # The photograph's exposure and sharpness, on the thumbnail already made: the best-variant
        # rule's image-quality term (instagram_feed_gen), for about 3 ms.
        self.quality = image_quality.measure(thumb)

    def cells(self, x1, y1, x2, y2):
        """Thumbnail cells of full-size boxes (arrays broadcast)."""
        h, w = self.luminance.shape
        s = self.scale
        cx1 = np.clip((np.asarray(x1) * s).astype(int), 0, w - 1)
        cy1 = np.clip((np.asarray(y1) * s).astype(int), 0, h - 1)
        cx2 = np.clip(np.ceil(np.asarray(x2) * s).astype(int), cx1 + 1, w)
        cy2 = np.clip(np.ceil(np.asarray(y2) * s).astype(int), cy1 + 1, h)
        return cx1, cy1, cx2, cy2


def _box_means(table: np.ndarray, x1, y1, x2, y2) -> np.ndarray:
    total = table[y2, x2] - table[y1, x2] - table[y2, x1] + table[y1, x1]
    return total / np.maximum(1, (x2 - x1) * (y2 - y1))


def _palette(img: Image.Image) -> list[tuple[int, int, int]]:
    quantised = img.quantize(colors=PALETTE_SIZE, method=Image.Quantize.MEDIANCUT)
    raw = quantised.getpalette() or []
    counts = sorted(quantised.getcolors() or [], reverse=True)
    return [tuple(raw[3 * idx : 3 * idx + 3]) for _, idx in counts]  # most frequent first


def margin(size: tuple[int, int]) -> int:
    return int(round(min(size) * MARGIN_RATIO))


def font_sizes(size: tuple[int, int]) -> list[int]:
    """Candidate em sizes in image px, largest first, the last one the legibility floor."""
    smallest = legibility.min_font_px(size)
    largest = max(smallest, int(round(size[1] * MAX_FONT_RATIO)))
    sizes, current = [], float(largest)
    while current > smallest:
        sizes.append(int(round(current)))
        current /= SIZE_STEP
    sizes.append(smallest)
    return sorted(set(sizes), reverse=True)


def layouts(text: str, font_size: int, max_width: int, max_height: int) -> list[Layout]:
    """The distinct wrappings of text at one size whose box fits max_width x max_height."""
    font = fonts.load_font(font_size)
    pad = textlayout.padding(font_size)
    out: dict[tuple[str, ...], Layout] = {}
    for fraction in WRAP_FRACTIONS:
        inner = int(max_width * fraction) - 2 * pad
        if inner <= 0:
            continue
        lines = textlayout.wrap_text(text, font, inner)
        if not lines or tuple(lines) in out or len(lines) > MAX_LINES:
            continue
        w, h = textlayout.box_size(lines, font)
        if w <= max_width and h <= max_height:
            out[tuple(lines)] = Layout(font_size, lines, (w, h))
    return list(out.values())


def _mask_table(size: tuple[int, int], boxes, scale: float) -> np.ndarray:
    """Integral image, `scale` times the image size, of the union of boxes rounded outwards."""
    width, height = max(1, math.ceil(size[0] * scale)), max(1, math.ceil(size[1] * scale))
    mask = np.zeros((height, width), dtype=np.float64)
    for x1, y1, x2, y2 in boxes:
        x1, y1 = max(0, math.floor(x1 * scale)), max(0, math.floor(y1 * scale))
        x2, y2 = min(width, math.ceil(x2 * scale)), min(height, math.ceil(y2 * scale))
        if x2 > x1 and y2 > y1:
            mask[y1:y2, x1:x2] = 1.0
    return saliency.integral_image(mask)


def _grown(box, grow: float):
    return (box[0] - grow, box[1] - grow, box[2] + grow, box[3] + grow)


def _forbidden(size, detections: Sequence[Detection], faces: Sequence[saliency.Face], persons, scale: float
               ) -> np.ndarray:
    """Where no text block may reach: objects, faces (with hair and chin) and persons, plus air."""
    air = CLEARANCE_RATIO * min(size)
    boxes = [_grown(d.box, air) for d in detections] + [_grown(p, air) for p in persons]
    for face in faces:
        fx1, fy1, fx2, fy2 = face.box
        boxes.append(_grown(face.box, air + FACE_CLEARANCE * max(fx2 - fx1, fy2 - fy1)))
        boxes.append(_grown(face.person, air))
    return _mask_table(size, boxes, scale)


def _face_mask(size, faces: Sequence[saliency.Face], scale: float) -> np.ndarray:
    boxes = []
    for face in faces:
        fx1, fy1, fx2, fy2 = face.box
        boxes.append(_grown(face.box, FACE_CLEARANCE * max(fx2 - fx1, fy2 - fy1)))
    return _mask_table(size, boxes, scale)


def _table_hits(table: np.ndarray, scale: float, x1, y1, x2, y2) -> np.ndarray:
    """Whether each full-size box touches the mask, its cells rounded outwards (never missed)."""
    h, w = table.shape[0] - 1, table.shape[1] - 1
    cx1 = np.clip(np.floor(np.asarray(x1) * scale).astype(int), 0, w)
    cy1 = np.clip(np.floor(np.asarray(y1) * scale).astype(int), 0, h)
    cx2 = np.clip(np.ceil(np.asarray(x2) * scale).astype(int), 0, w)
    cy2 = np.clip(np.ceil(np.asarray(y2) * scale).astype(int), 0, h)
    return (table[cy2, cx2] - table[cy1, cx2] - table[cy2, cx1] + table[cy1, cx1]) > 0.5


def _subject_centre(maps: _Maps, size: tuple[int, int], subject: np.ndarray) -> tuple[float, float]:
    """Centre of visual weight in image px: the subject map where it knows something, else saliency."""
    weight = subject if subject.max() > 0.05 else maps.saliency_map
    if weight.shape != maps.luminance.shape:
        weight = saliency.resize_map(weight, (maps.luminance.shape[1], maps.luminance.shape[0]))
    total = weight.sum()
    if total <= 0:
        return size[0] / 2, size[1] / 2
    ys, xs = np.mgrid[0 : weight.shape[0], 0 : weight.shape[1]]
    sx, sy = size[0] / weight.shape[1], size[1] / weight.shape[0]
    return float(((weight * (xs + 0.5)).sum() / total) * sx), float(((weight * (ys + 0.5)).sum() / total) * sy)


def _centre_prior(size: tuple[int, int]) -> np.ndarray:
    width, height = size
    x = (np.arange(width) + 0.5) / width - 0.5
    y = (np.arange(height) + 0.5) / height - 0.5
    return CENTRE_PRIOR * np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * CENTRE_SIGMA**2))


def _align_for(cx: float, width: int) -> str:
    # Flush towards the nearer edge, as a designer sets copy in a corner; centred in the middle.
    if cx < width / 3:
        return "left"
    if cx > 2 * width / 3:
        return "right"
    return "center"


class _Search:
    def __init__(self, img: Image.Image, detections: Sequence[Detection], faces: Sequence[saliency.Face],
                 persons: Sequence[tuple[float, float, float, float]] = ()):
        self.img = img
        self.size = img.size
        self.detections = list(detections)
        self.faces = list(faces)
        self.persons = list(persons)  # segmented people (stages/people.py), boxes in image px
        boxes = [(d.box, saliency.PRODUCT_WEIGHT if d.is_product else saliency.OBJECT_WEIGHT) for d in detections]
        boxes += [(p, saliency.PERSON_WEIGHT) for p in self.persons]
        thumb = min(1.0, ANALYSIS_MAX_SIDE / max(self.size))
        known = saliency.subject_map(self.size, self.faces, boxes, scale=thumb)
        self.known = known
        self.maps = _Maps(img, np.maximum(known, _centre_prior((known.shape[1], known.shape[0]))))
        self.cscale = min(1.0, CONSTRAINT_MAX_SIDE / max(self.size))
        self.forbidden = _forbidden(self.size, self.detections, self.faces, self.persons, self.cscale)
        self.face_table = _face_mask(self.size, self.faces, self.cscale)
        self.subject_centre = _subject_centre(self.maps, self.size, known)
        self.sizes = font_sizes(self.size)

    def _grid(self, lo: int, hi: int) -> np.ndarray:
        if hi < lo:
            return np.zeros(0, dtype=int)
        step = max(2, (max(self.size) - 2 * margin(self.size)) // GRID_STEPS)
        values = np.arange(lo, hi + 1, step)
        return np.unique(np.append(values, hi)).astype(int)

    def candidates(self, text: str) -> list[Candidate]:
        """Every block inside the margins that passes the hard constraints, with its pre-score."""
        width, height = self.size
        m = margin(self.size)
        image_area = width * height
        found: list[Candidate] = []
        cx0, cy0 = width / 2, height / 2
        half_diag = math.hypot(width, height) / 2
        largest = self.sizes[0]
        for font_size in self.sizes:
            for layout in layouts(text, font_size, width - 2 * m, height - 2 * m):
                bw, bh = layout.size
                if bw * bh > MAX_BLOCK_SHARE * image_area:
                    continue
                xs, ys = self._grid(m, width - m - bw), self._grid(m, height - m - bh)
                if xs.size == 0 or ys.size == 0:
                    continue
                X, Y = np.meshgrid(xs, ys)
                X2, Y2 = X + bw, Y + bh
                ok = ~_table_hits(self.forbidden, self.cscale, X, Y, X2, Y2)
                if not ok.any():
                    continue
                X, Y, X2, Y2 = X[ok], Y[ok], X2[ok], Y2[ok]
                c = self.maps.cells(X, Y, X2, Y2)
                sal = _box_means(self.maps.saliency, *c)
                subj = _box_means(self.maps.subject, *c)
                busy = _box_means(self.maps.edges, *c)
                salient = _box_means(self.maps.salient, *c)
                tx, ty = (X + X2) / 2, (Y + Y2) / 2
                mid_x, mid_y = (tx + self.subject_centre[0]) / 2, (ty + self.subject_centre[1]) / 2
                balance = 1.0 - np.minimum(1.0, np.hypot(mid_x - cx0, mid_y - cy0) / (half_diag / 2))
                size_term = font_size / largest
                share = bw * bh / image_area
                pre = (
                    1.0
                    - WEIGHTS["saliency"] * sal
                    - WEIGHTS["subject"] * subj
                    - WEIGHTS["busyness"] * busy
                    + WEIGHTS["size"] * size_term
                    + WEIGHTS["balance"] * balance
                    - WEIGHTS["block_share"] * share
                    - WEIGHTS["salient_share"] * salient
                    - WEIGHTS["extra_lines"] * max(0, len(layout.lines) - 2)
                )
                # Keep a handful per layout: the contrast pass below measures the best few overall.
                for i in np.argsort(-pre)[:12]:
                    box = (int(X[i]), int(Y[i]), int(X2[i]), int(Y2[i]))
                    found.append(
                        Candidate(
                            box,
                            layout,
                            _align_for(tx[i], width),
                            "search",
                            float(pre[i]),
                            {
                                "saliency": float(sal[i]),
                                "subject": float(subj[i]),
                                "busyness": float(busy[i]),
                                "size": size_term,
                                "balance": float(balance[i]),
                                "block_share": share,
                                "salient_share": float(salient[i]),
                            },
                        )
                    )
        return found

    def bands(self, text: str) -> list[Candidate]:
        """Full-width bands at the top and bottom edges that hold the text and cover no face.

        A band covers part of the subject by nature, so its score weighs how much of the subject
        map's weight it covers against the size of the type.
        """
        width, height = self.size
        m = margin(self.size)
        out: list[Candidate] = []
        largest = self.sizes[0]
        known = self.known
        total = float(known.sum())
        for font_size in self.sizes:
            pad = textlayout.padding(font_size)
            for layout in layouts(text, font_size, width - 2 * m, height):
                bh = layout.size[1] + 2 * pad  # the backing reaches past the text to the edge
                if width * bh > MAX_BLOCK_SHARE * width * height:
                    continue
                for region, y1 in (("band_top", 0), ("band_bottom", height - bh)):
                    box = (0, y1, width, y1 + bh)
                    if _table_hits(self.face_table, self.cscale, *box):
                        continue
                    c = self.maps.cells(*box)
                    subj = float(_box_means(self.maps.subject, *c))
                    ky1, ky2 = int(c[1]), int(c[3])
                    covered = float(known[ky1:ky2].sum()) / total if total > 0 else bh / height
                    size_term = font_size / largest
                    score = (
                        1.0
                        - 2.0 * covered
                        + WEIGHTS["size"] * size_term
                        - WEIGHTS["extra_lines"] * max(0, len(layout.lines) - 2)
                    )
                    out.append(
                        Candidate(
                            box,
                            Layout(font_size, layout.lines, (width, bh)),
                            "center",
                            region,
                            score,
                            {"saliency": 0.0, "subject": subj, "subject_covered": covered, "busyness": 0.0,
                             "size": size_term, "balance": 0.0},
                        )
                    )
        return out


def _pick_colour(maps: _Maps, cell) -> tuple[tuple[int, int, int], float]:
    x1, y1, x2, y2 = (int(v) for v in cell)
    background = imaging.ContrastTable(maps.luminance[y1:y2, x1:x2])
    palette = [(c, background.worst(c)) for c in maps.palette]
    strong = [pc for pc in palette if pc[1] >= PALETTE_MIN_CONTRAST]
    if strong:
        return max(strong, key=lambda pc: pc[1])
    mono = [(c, background.worst(c)) for c in (BLACK, WHITE)]
    return max(mono, key=lambda pc: pc[1])


def extensions(search: _Search, text: str) -> list[dict]:
    """Proposals that put `text` on a band added above or below the photo, best first.

    The band continues the photo's edge colour (the mean of its outer EXTEND_EDGE), so the post
    reads as one designed frame; the text colour is black, white or a palette colour, whichever
    reads best on it. The block share counts the band against the extended canvas.
    """
    width, height = search.size
    m = margin(search.size)
    maps = search.maps
    strip = max(1, round(EXTEND_EDGE * maps.rgb.shape[0]))  # in thumbnail rows
    edge = max(1, round(EXTEND_EDGE * height))  # in image rows
    edges = {"extend_top": (maps.rgb[:strip], (0, 0, width, edge)),
             "extend_bottom": (maps.rgb[-strip:], (0, height - edge, width, height))}
    largest = search.sizes[0]
    found: list[dict] = []
    for region, (pixels, edge_box) in edges.items():
        band_rgb = tuple(int(round(v)) for v in pixels.reshape(-1, 3).mean(axis=0))
        band_lum = imaging.relative_luminance(band_rgb)
        contrast, colour = max((float(imaging.contrast_ratio(imaging.colour_luminance(tuple(c)), band_lum)), tuple(c))
                               for c in [*maps.palette, BLACK, WHITE])
        busy = float(_box_means(maps.edges, *maps.cells(*edge_box)))
        for font_size in search.sizes:
            pad = textlayout.padding(font_size)
            fitting = [lay for lay in layouts(text, font_size, width - 2 * m, height)
                       if lay.size[1] + 2 * pad <= MAX_BLOCK_SHARE * (height + lay.size[1] + 2 * pad)]
            if not fitting:
                continue
            layout = min(fitting, key=lambda lay: lay.size[1])
            bh = layout.size[1] + 2 * pad
            canvas_size = (width, height + bh)
            if legibility.css_px(font_size, canvas_size) < legibility.MIN_CSS_PX - 1e-9:
                continue  # a taller canvas shows smaller on the phone (legibility.display_scale)
            top = region == "extend_top"
            box = (0, 0, width, bh) if top else (0, height, width, height + bh)
            size_term = font_size / largest
            score = WEIGHTS["size"] * size_term + EXTEND_BUSYNESS_WEIGHT * (1.0 - busy)
            found.append({
                "region": region, "box": list(box), "align": "center", "font_size": font_size,
                "color": imaging.rgb_to_hex(colour), "lines": list(layout.lines), "backing": False,
                "canvas": {"size": list(canvas_size), "offset": [0, bh if top else 0], "photo_size": [width, height],
                           "color": imaging.rgb_to_hex(band_rgb)},
                "css_px": round(legibility.css_px(font_size, canvas_size), 2),
                "block_share": round(bh / canvas_size[1], 4),
                "scores": {"object_overlap": 0.0, "product_overlap": 0.0, "contrast": round(contrast, 4),
                           "subject_covered": 0.0, "size": round(size_term, 4), "busyness": round(busy, 4)},
                "score": round(float(score), 4),
            })
            break  # the largest type that fits this edge
    return sorted(found, key=lambda p: -p["score"])


def _overlaps(box: Sequence[int], detections: Sequence[Detection]) -> tuple[float, float]:
    """(largest share of any object covered, of the product covered), each in [0, 1]."""
    worst = product = 0.0
    for det in detections:
        inter = intersection(box, det.box)
        if inter is None or area(det.box) <= 0:
            continue
        share = min(1.0, area(inter) / area(det.box))
        worst = max(worst, share)
        if det.is_product:
            product = max(product, share)
    return worst, product


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    inter = intersection(a, b)
    if inter is None:
        return 0.0
    i = area(inter)
    return i / (area(a) + area(b) - i)


def _finalise(search: _Search, found: list[Candidate], backing: bool) -> list[dict]:
    """Measures contrast on the best pre-scored candidates; returns distinct proposals, best first."""
    shortlist = sorted(found, key=lambda c: -c.prescore)[:CONTRAST_SHORTLIST]
    scored = []
    for cand in shortlist:
        cell = search.maps.cells(*cand.box)
        colour, contrast = _pick_colour(search.maps, cell)
        if backing:
            # The backing is what the text sits on: black or white, whichever the text reads best on.
            colour, contrast = WHITE, 21.0
        object_overlap, product_overlap = _overlaps(cand.box, search.detections)
        score = cand.prescore + WEIGHTS["contrast"] * min(contrast, CONTRAST_CAP) / CONTRAST_CAP
        scored.append((score, cand, colour, contrast, object_overlap, product_overlap))
    scored.sort(key=lambda s: -s[0])
    proposals: list[dict] = []
    for score, cand, colour, contrast, object_overlap, product_overlap in scored:
        if any(_iou(cand.box, p["box"]) > DISTINCT_IOU for p in proposals):
            continue
        proposals.append(
            {
                "region": cand.region,
                "box": list(cand.box),
                "align": cand.align,
                "font_size": cand.layout.font_size,
                "color": imaging.rgb_to_hex(colour),
                "lines": list(cand.layout.lines),
                "backing": backing,
                "css_px": round(legibility.css_px(cand.layout.font_size, search.size), 2),
                "block_share": round(area(cand.box) / (search.size[0] * search.size[1]), 4),
                "scores": {
                    "object_overlap": round(object_overlap, 4),
                    "product_overlap": round(product_overlap, 4),
                    "contrast": round(float(contrast), 4),
                    **{k: round(float(v), 4) for k, v in cand.terms.items()},
                },
                "score": round(float(score), 4),
            }
        )
        if len(proposals) >= PROPOSALS:
            break
    return proposals


def headlines(text: str) -> list[str]:
    """Shorter heads of the copy to try on the image, longest first: sentence, clause, word runs."""
    out: list[str] = []

    def add(candidate: str) -> None:
        candidate = candidate.strip()
        if candidate and candidate != text and candidate not in out:
            out.append(candidate)

    sentences = [s for s in _SENTENCE_END.split(text) if s.strip()]
    if len(sentences) > 1:
        add(sentences[0])
    first = sentences[0] if sentences else text
    clauses = [c for c in _CLAUSE_END.split(first) if c and c.strip()]
    if len(clauses) > 1:
        add(clauses[0])
    out = [h for h in out if len(h) <= MAX_HEADLINE_CHARS]
    words = (clauses[0] if clauses else first).split()
    n = len(words)
    while n > MIN_HEADLINE_WORDS:
        n = max(MIN_HEADLINE_WORDS, int(n * 0.66))
        add(" ".join(words[:n]))
    return out


def _caption_rest(text: str, head: str) -> str:
    return text[len(head) :].strip() if text.startswith(head) else text


def trusted_people(yolo: Mapping[str, Any], detections: Sequence[Detection]) -> list | None:
    """The person boxes of a detector with real weights (saliency.find_faces then looks for faces
    in their heads only), or None where its boxes say nothing (the tiny profile's random weights):
    faces are then searched in the whole image."""
    if yolo.get("profile") != "real":
        return None
    return [d.box for d in detections if d.label == "person"]


def plan(img: Image.Image, copy: str, detections: Sequence[Detection], faces: Sequence[saliency.Face] | None = None,
         persons: Sequence[tuple[float, float, float, float]] | None = None) -> dict:
    """The placement search and its fallback ladder; returns the proposals and how they were found.
    `faces` and `persons` (segmented people) are searched for in the whole image when None."""
    faces = saliency.find_faces(img) if faces is None else list(faces)
    persons = people_finder.find_people(img) if persons is None else list(persons)
    search = _Search(img, detections, faces, persons)
    attempts: list[str] = []

    found = search.candidates(copy)
    if found:
        return {"proposals": _finalise(search, found, False), "fallback": "", "image_text": copy,
                "caption_text": "", "search": search}
    attempts.append(f"the whole copy fits no block clear of objects, faces and persons at >= {search.sizes[-1]} px")

    for head in headlines(copy):
        found = search.candidates(head)
        if found:
            return {"proposals": _finalise(search, found, False), "fallback": "headline", "image_text": head,
                    "caption_text": _caption_rest(copy, head), "search": search}
    attempts.append("no headline of the copy fits such a block either")

    for text in [copy, *headlines(copy)]:
        found = extensions(search, text)
        if found:
            return {"proposals": found, "fallback": "extend" if text == copy else "headline+extend",
                    "image_text": text, "caption_text": "" if text == copy else _caption_rest(copy, text),
                    "search": search}
    attempts.append(f"no band added above or below the photo holds even its headline within {MAX_BLOCK_SHARE:.0%} "
                    "of the canvas")

    for text in [copy, *headlines(copy)]:
        bands = search.bands(text)
        if bands:
            fallback = "band" if text == copy else "headline+band"
            return {"proposals": _finalise(search, bands, True), "fallback": fallback, "image_text": text,
                    "caption_text": "" if text == copy else _caption_rest(copy, text), "search": search}
    attempts.append("no full-width band at the top or bottom edge holds even one word without covering a face")
    width, height = img.size
    raise PermanentStageError(
        f"no place for the ad copy on this {width}x{height} image: " + "; ".join(attempts),
        {
            "characters": len(copy),
            "min_font_size": search.sizes[-1],
            "min_css_px": legibility.MIN_CSS_PX,
            "max_block_share": MAX_BLOCK_SHARE,
            "image_size": [width, height],
            "faces": [[round(v, 1) for v in f.box] for f in faces],
            "persons": [[round(v, 1) for v in box] for box in persons],
            "detections": len(detections),
        },
    )


def choose(proposals: Sequence[dict]) -> dict:
    return min(
        enumerate(proposals),
        key=lambda ip: (ip[1]["scores"]["product_overlap"] > 0, -ip[1]["score"], ip[0]),
    )[1]


def warm(profile: str | None = None, device: str = "cpu") -> None:
    """Loads the face detector and the person segmenter's runtime at worker start, so that the
    first tasks (every stage thread at once) do not wait for the imports."""
    saliency.face_detector_name()
    people_finder.finder_name()


def run(inp: StageInput) -> StageOutput:
    img = imaging.load_image(inp.image)
    # Hashtags and emoji are the caption's (textlayout.image_text); the rest is drawn.
    drawn, caption_only = textlayout.image_text(inp.ad_copy)
    copy, dropped = fonts.clean_text_report(drawn)
    if not copy:
        raise PermanentStageError(
            "ad copy is empty after cleaning: nothing can be drawn on the image (hashtags and emoji go to "
            "the caption only; characters the font cannot render are dropped)",
            {"dropped": dropped[:50], "caption_only": caption_only[:50]},
        )
    yolo = inp.results.get("yolo_detect")
    detections = read_detections(yolo, img.size)
    people = trusted_people(yolo, detections)
    # A detector with real weights has drawn the persons already; without one, segment them.
    found = plan(img, copy, detections, saliency.find_faces(img, people), [] if people is not None else None)
    proposals = found["proposals"]
    for i, proposal in enumerate(proposals):
        proposal["proposal_id"] = f"p{i}"
    chosen = choose(proposals)
    search = found["search"]
    return StageOutput(
        result={
            "text": found["image_text"],
            "copy": copy,
            "image_text": found["image_text"],
            "caption_text": found["caption_text"],
            "fallback": found["fallback"],
            "dropped_characters": "".join(dropped),
            "caption_only": caption_only,
            "lines": chosen["lines"],
            "image_size": list(img.size),
            "font": os.path.basename(fonts.font_path()),
            "min_font_size": search.sizes[-1],
            "faces": [
                {"box": [round(v, 1) for v in f.box], "score": round(f.score, 3),
                 "person": [round(v, 1) for v in f.person]}
                for f in search.faces
            ],
            "image_quality": search.maps.quality,
            "face_detector": saliency.face_detector_name(),
            "persons": [[round(v, 1) for v in box] for box in search.persons],
            # "trusted detector": the persons are yolo_detect's; else whatever segmented them.
            "person_finder": "trusted detector" if people is not None else people_finder.finder_name(),
            # Where faces were looked for: the whole image, or the heads of the persons a
            # detector with real weights found (none: a product shot, no face search).
            "face_search": "whole image" if people is None else f"head regions of {len(people)} detected person(s)",
            "proposals": proposals,
            "proposal_id": chosen["proposal_id"],
            "scoring": SCORING_RULE,
        }
    )
