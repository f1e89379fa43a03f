"""Where people are when no detector with real weights looked: MediaPipe's selfie segmentation.

A face detector finds frontal faces only (a profile looking down is missed) and says nothing of the
arms and shoulders around a face; the planner must still keep copy off every person in a portrait
when the object detector is the tiny profile's random YOLO. MediaPipe's "general" selfie
segmentation model (a 250 KB MobileNetV3-based network, Apache-2.0) ships inside the `mediapipe`
0.10.14 wheel on PyPI, so it loads offline, and segments a 1280x720 photograph in 20-50 ms on one
core. Later mediapipe releases no longer bundle the legacy models (0.10.30 and on) or cap numpy
below 2 (0.10.15-0.10.21), and the wheel's declared dependencies would install
`opencv-contrib-python` over the `opencv-python` that ultralytics uses and all of jax; so `make
install` installs this one wheel with `--no-deps` (its runtime needs absl-py, flatbuffers and
protobuf 4, which pyproject.toml lists). docs/quality.md has the candidates measured.

Each connected region of the mask becomes a person box, what an object detector would give: the
planner keeps copy off those boxes as it does off YOLO's `person` boxes.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image

from stages import imaging

# The model's output is a per-pixel probability; at 0.5 the mask follows the silhouette (hair and
# suit edges included) on the evaluation photographs without taking in the blurred crowd behind.
PERSON_LEVEL = 0.5
# Regions smaller than this share of the image are specks of background the model half-believes,
# not people a viewer looks at.
MIN_PERSON_SHARE = 0.01
WORK_SIDE = 512  # the model runs at 256x256: a larger copy only costs the conversion
NAME = "MediaPipe 0.10.14 selfie segmentation (general)"


@functools.lru_cache(maxsize=1)
def _solution():
    # absl's C++ logging prints a banner per graph to stderr unless told otherwise.
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        from mediapipe.python.solutions import selfie_segmentation
    except ImportError:
        return None
    return selfie_segmentation


def finder_name() -> str:
    """What finds people here, for results and logs ("none" where mediapipe is not installed)."""
    return NAME if _solution() is not None else "none"


def person_mask(img: Image.Image) -> np.ndarray | None:
    """Probability that each pixel of a copy at most WORK_SIDE long shows a person; None where the
    segmenter is not installed."""
    solution = _solution()
    if solution is None:
        return None
    work, _ = imaging.downscaled(img, WORK_SIDE)
    rgb = np.ascontiguousarray(np.asarray(work.convert("RGB"), dtype=np.uint8))
    # A graph per call: a solution object is not safe to share between the worker's stage threads,
    # and building one costs a few milliseconds next to the inference.
    with solution.SelfieSegmentation(model_selection=0) as segmenter:
        mask = segmenter.process(rgb).segmentation_mask
    return np.asarray(mask, dtype=np.float32)


def find_people(img: Image.Image) -> list[tuple[float, float, float, float]]:
    """Boxes (image pixels) of the people in `img`, largest first; [] where the segmenter is not
    installed or sees nobody."""
    import cv2  # ultralytics' opencv-python: connected components in C

    mask = person_mask(img)
    if mask is None:
        return []
    binary = (mask >= PERSON_LEVEL).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    h, w = binary.shape
    sx, sy = img.size[0] / w, img.size[1] / h
    boxes = []
    for x, y, bw, bh, area in stats[1:count]:
        if area >= MIN_PERSON_SHARE * w * h:
            boxes.append((area, (float(x * sx), float(y * sy), float((x + bw) * sx), float((y + bh) * sy))))
    return [box for _, box in sorted(boxes, key=lambda ab: -ab[0])]
