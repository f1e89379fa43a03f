"""Where an image draws the eye and where it is busy: maps the planner and the evaluators score with.

All maps are plain 2-D float arrays; box statistics go through summed-area tables so scoring many
candidate boxes costs one pass over the image. Faces come from dlib's HOG frontal-face detector
(the model is compiled into the library, so it loads offline) and rate as the most important thing
in the picture, with the person each face belongs to, whether or not an object detector ran.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from stages import imaging

# A Sobel response (kernel normalised by 1/8) of EDGE_THRESHOLD means a step of about twice that in
# grey levels: a visible edge or fine texture, well above JPEG noise and soft gradients.
EDGE_THRESHOLD = 10.0
# Above this share of edge pixels a background competes with the text drawn on it (readability_eval
# fails it; overlay lays a scrim to calm it).
MAX_BUSYNESS = 0.15
AMPLITUDE_FLOOR = 0.1
SALIENCY_WORK_SIZE = 64  # the spectral-residual method is defined on a thumbnail of about this size


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes a float map to (width, height) with bilinear interpolation."""
    img = Image.fromarray(np.asarray(values, dtype=np.float32))
    return np.asarray(img.resize(size, Image.Resampling.BILINEAR), dtype=np.float64)


def _box_filter_wrap(values: np.ndarray, radius: int) -> np.ndarray:
    # Periodic borders, because the spectrum the filter runs on is periodic.
    total = np.zeros_like(values)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            total += np.roll(values, (dy, dx), axis=(0, 1))
    return total / float((2 * radius + 1) ** 2)


def gaussian_blur(values: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return values.astype(np.float64)
    radius = max(1, int(round(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x * x) / (2 * sigma * sigma))
    kernel /= kernel.sum()
    out = np.asarray(values, dtype=np.float64)
    for axis in (0, 1):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect" if out.shape[axis] > radius else "edge")
        windows = np.lib.stride_tricks.sliding_window_view(padded, kernel.size, axis=axis)
        out = windows @ kernel
    return out


def spectral_residual(grey: np.ndarray) -> np.ndarray:
    """Saliency map in [0, 1] at the input's size (Hou & Zhang 2007, spectral residual)."""
    h, w = grey.shape
    scale = SALIENCY_WORK_SIZE / max(h, w)
    small_size = (max(8, round(w * scale)), max(8, round(h * scale)))
    small = resize_map(grey, small_size)
    # The FFT treats the image as periodic: padding with the border pixels moves the seam where the
    # top edge meets the bottom edge away from the image, so the seam is not called salient.
    pad_y, pad_x = small.shape[0] // 4, small.shape[1] // 4
    padded = np.pad(small, ((pad_y, pad_y), (pad_x, pad_x)), mode="edge")
    # Without its mean the constant term cannot dominate the reconstruction; with it, the map would
    # follow the sign of the residual signal instead of its energy and light up beside objects.
    spectrum = np.fft.fft2(padded - padded.mean())
    amplitude = np.abs(spectrum)
    # A floor under the amplitude: flat synthetic shapes have exact spectral zeros whose huge negative
    # logs would otherwise dominate the residual and ring across the whole map.
    log_amplitude = np.log(amplitude + AMPLITUDE_FLOOR * amplitude.mean() + 1e-12)
    residual = log_amplitude - _box_filter_wrap(log_amplitude, 1)
    saliency = np.abs(np.fft.ifft2(np.exp(residual + 1j * np.angle(spectrum)))) ** 2
    saliency = gaussian_blur(saliency, sigma=2.5)[
        pad_y : pad_y + small.shape[0], pad_x : pad_x + small.shape[1]
    ]
    saliency -= saliency.min()
    peak = saliency.max()
    if peak > 0:
        saliency /= peak
    return np.clip(resize_map(saliency, (w, h)), 0.0, 1.0)


def gradient_magnitude(grey: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude, in grey levels per pixel (kernel normalised by 1/8)."""
    p = np.pad(np.asarray(grey, dtype=np.float64), 1, mode="edge")
    gx = ((p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])) / 8.0
    gy = ((p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])) / 8.0
    return np.hypot(gx, gy)


def edge_map(grey: np.ndarray) -> np.ndarray:
    """1.0 where a visible edge passes, 0.0 elsewhere."""
    return (gradient_magnitude(grey) > EDGE_THRESHOLD).astype(np.float64)


def edge_density(grey: np.ndarray) -> float:
    """Share of pixels on a visible edge: 0 for a flat background, towards 1 for dense texture."""
    if grey.size == 0:
        return 0.0
    return float(edge_map(grey).mean())


def integral_image(values: np.ndarray) -> np.ndarray:
    table = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    table[1:, 1:] = np.cumsum(np.cumsum(values, axis=0), axis=1)
    return table


def box_mean(table: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Mean of the map inside integer box (x1, y1, x2, y2), x2/y2 exclusive, from its integral."""
    x1, y1, x2, y2 = box
    area = (x2 - x1) * (y2 - y1)
    if area <= 0:
        return 0.0
    total = table[y2, x2] - table[y1, x2] - table[y2, x1] + table[y1, x1]
    return float(total / area)


# --- faces and people ------------------------------------------------------------------------------

FACE_WORK_SIDE = 1024  # faces are searched on a copy this long at most: HOG cost grows with pixels
FACE_UPSAMPLE = 1  # one pyramid step up: finds faces down to ~40 px on the work copy
FACE_MIN_SCORE = 0.0  # dlib's SVM margin: below 0 most hits in busy street scenes are not faces
# A person under a detected face, in face widths / heights: shoulders span about three face widths
# and a standing body about seven face heights. Generous on purpose: a guess that covers a little
# background costs a placement option, a guess that misses a shoulder puts text on the person.
PERSON_HALF_WIDTH = 1.6
PERSON_ABOVE = 0.6  # hair and hats above the detected face box
PERSON_BELOW = 6.5
FACE_WEIGHT = 1.0  # importance of a face in the subject map
PERSON_WEIGHT = 0.8
OBJECT_WEIGHT = 0.6
PRODUCT_WEIGHT = 1.0


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # in the image's pixels
    score: float
    person: tuple[float, float, float, float]  # the estimated person the face belongs to


@functools.lru_cache(maxsize=1)
def _face_detector():
    try:
        import dlib  # the dlib-bin wheel: prebuilt, its HOG face model needs no download
    except ImportError:
        return None
    return dlib.get_frontal_face_detector()


def face_detector_name() -> str:
    """What finds faces here, for results and logs ("none" where dlib is not installed)."""
    return "dlib HOG frontal face" if _face_detector() is not None else "none"


def _clip(box, width: int, height: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = box
    return (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))


def person_from_face(face_box, size: tuple[int, int]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = face_box
    fw, fh = x2 - x1, y2 - y1
    cx = (x1 + x2) / 2
    return _clip(
        (cx - PERSON_HALF_WIDTH * fw, y1 - PERSON_ABOVE * fh, cx + PERSON_HALF_WIDTH * fw, y2 + PERSON_BELOW * fh),
        *size,
    )


# Where a face can be in a detected person: the top of the box (a standing body is about seven face
# heights, a seated or cropped one fewer), at least as tall as the box is wide (a portrait's box is
# mostly head and shoulders), a little wider than the box (a turned head, a box cut at the
# shoulder).
HEAD_PART = 0.45
HEAD_MARGIN = 0.15
FACE_DUPLICATE_IOU = 0.3  # two hits this much alike, from overlapping person boxes, are one face
# The face a person box suggests: a seventh of a standing body, a quarter of a box cut at the
# waist or a portrait. Below this many pixels the head region is searched one pyramid step up
# (dlib's window is 80 px; upsampling costs four times the pixels).
SMALL_FACE = 120


def _detect(img: Image.Image, offset: tuple[float, float] = (0.0, 0.0), upsample: int = FACE_UPSAMPLE
            ) -> list[tuple[tuple, float]]:
    """(box in the full image's pixels, score) of every frontal face in `img`, a crop at `offset`."""
    detector = _face_detector()
    work, scale = imaging.downscaled(img, FACE_WORK_SIDE)
    grey = np.ascontiguousarray(np.asarray(work.convert("L"), dtype=np.uint8))
    rects, scores, _ = detector.run(grey, upsample, FACE_MIN_SCORE)
    ox, oy = offset
    return [((ox + r.left() / scale, oy + r.top() / scale, ox + (r.right() + 1) / scale, oy + (r.bottom() + 1) / scale),
             float(s)) for r, s in zip(rects, scores, strict=True)]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def head_regions(people: Sequence[tuple[float, float, float, float]], size: tuple[int, int]
                 ) -> list[tuple[tuple[int, int, int, int], int]]:
    """The part of each person box a face can be in (whole pixels, clipped to the image), and the
    upsampling its expected face size needs."""
    out = []
    for x1, y1, x2, y2 in people:
        w, h = x2 - x1, y2 - y1
        region = _clip((x1 - HEAD_MARGIN * w, y1 - 0.05 * h, x2 + HEAD_MARGIN * w, y1 + max(HEAD_PART * h, w)), *size)
        box = tuple(int(round(v)) for v in region)
        if box[2] - box[0] >= 8 and box[3] - box[1] >= 8:
            out.append((box, 1 if max(h / 7, w / 4) < SMALL_FACE else 0))
    return out


def find_faces(img: Image.Image, people: Sequence[tuple[float, float, float, float]] | None = None) -> list[Face]:
    """Frontal faces (and the persons under them), strongest first; [] where no detector is installed.

    `people`: the person boxes of an object detector with real weights, or None when there is
    none (the tiny profile's random YOLO, a test). With them, faces are searched only in each
    person's head region, and not at all when the detector saw no person: a product shot costs
    nothing, and a photograph costs its heads instead of its whole area upsampled, which was
    two thirds of the planner's CPU (docs/benchmarks.md). Without them, the whole image.
    """
    if _face_detector() is None:
        return []
    if people is None:
        hits = _detect(img)
    else:
        hits = []
        for (x1, y1, x2, y2), upsample in head_regions(people, img.size):
            hits += _detect(img.crop((x1, y1, x2, y2)), (x1, y1), upsample)
    kept: list[tuple[tuple, float]] = []
    for box, score in sorted(hits, key=lambda h: -h[1]):
        box = _clip(box, *img.size)
        if box[2] > box[0] and box[3] > box[1] and all(_iou(box, k[0]) < FACE_DUPLICATE_IOU for k in kept):
            kept.append((box, score))
    return [Face(box, score, person_from_face(box, img.size)) for box, score in kept]


def subject_map(
    size: tuple[int, int],
    faces: list[Face],
    boxes: list[tuple[tuple[float, float, float, float], float]],
    scale: float = 1.0,
) -> np.ndarray:
    """Importance in [0, 1]: faces 1.0, their persons and the given (box, weight) pairs at their
    weights, softened so the area right around a subject also counts.

    Boxes are in the image's pixels (`size`, w x h); the map is computed `scale` times smaller
    (a thumbnail is enough for box means, and blurring a full photograph would cost seconds).
    """
    width, height = max(1, round(size[0] * scale)), max(1, round(size[1] * scale))
    out = np.zeros((height, width), dtype=np.float64)

    def paint(box, weight: float) -> None:
        x1, y1, x2, y2 = _clip(box, *size)
        x1, y1 = int(np.floor(x1 * scale)), int(np.floor(y1 * scale))
        x2, y2 = int(np.ceil(x2 * scale)), int(np.ceil(y2 * scale))
        if x2 > x1 and y2 > y1:
            out[y1:y2, x1:x2] = np.maximum(out[y1:y2, x1:x2], weight)

    for box, weight in boxes:
        paint(box, weight)
    for face in faces:
        paint(face.person, PERSON_WEIGHT)
        paint(face.box, FACE_WEIGHT)
    return np.clip(gaussian_blur(out, sigma=max(1.0, 0.03 * max(width, height))), 0.0, 1.0)
