"""Where people are when no detector with real weights looked: MediaPipe's selfie segmentation model.

A face detector finds frontal faces only (a profile looking down is missed) and says nothing of the
arms and shoulders around a face; the planner must still keep copy off every person in a portrait
when the object detector is the tiny profile's random YOLO. MediaPipe's "general" selfie
segmentation model (a 250 KB MobileNetV3-based network, Apache-2.0) ships inside the `mediapipe`
0.10.14 wheel on PyPI, so it loads offline; it runs here through Google's LiteRT interpreter
(`ai-edge-litert`, the maintained TensorFlow Lite runtime), one interpreter per stage thread, and
segments a photograph in 10-40 ms on one core.

Not through mediapipe's own graph runtime: with three planner threads starting at once, a worker's
planner stages hung for good (tests/test_report.py on a fresh clone, 2026-12-02) and a script
doing the same exited without a word once in six; an interpreter per thread has no graph threads
and no callbacks. mediapipe is installed only for the model file: later releases no longer bundle
it (0.10.30 and on) or cap numpy below 2 (0.10.15-0.10.21), and the wheel's declared
dependencies would install `opencv-contrib-python` over ultralytics' `opencv-python` and all of
jax, so `make install` installs that one wheel with `--no-deps` and never imports it.
docs/quality.md has the candidates measured.

Each connected region of the mask becomes a person box, what an object detector would give: the
planner keeps copy off those boxes as it does off YOLO's `person` boxes.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import threading

import numpy as np
from PIL import Image


# The model's output is a per-pixel probability; at 0.5 the mask follows the silhouette (hair and
# suit edges included) on the evaluation photographs without taking in the blurred crowd behind.
PERSON_LEVEL = 0.5
# Regions smaller than this share of the image are specks of background the model half-believes,
# not people a viewer looks at.
MIN_PERSON_SHARE = 0.01
NAME = "MediaPipe selfie segmentation (general), LiteRT"
MODEL = ("mediapipe", "modules/selfie_segmentation/selfie_segmentation.tflite")
INPUT_SIDE = 256  # the model's input is 256x256 RGB in [0, 1]; the photo is stretched to it


@functools.lru_cache(maxsize=1)
def _model_path() -> str | None:
    """The model file inside the installed mediapipe package, found without importing mediapipe."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401 - only whether it is there
    except ImportError:
        return None
    spec = importlib.util.find_spec(MODEL[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], MODEL[1])
    return path if os.path.isfile(path) else None


_local = threading.local()  # each stage thread's own interpreter: one is not safe to share


def _interpreter():
    found = getattr(_local, "interpreter", None)
    if found is None:
        from ai_edge_litert.interpreter import Interpreter

        found = Interpreter(model_path=_model_path(), num_threads=1)
        found.allocate_tensors()
        _local.interpreter = found
    return found


def finder_name() -> str:
    """What finds people here, for results and logs ("none" where the model or runtime is missing)."""
    return NAME if _model_path() is not None else "none"


def person_mask(img: Image.Image) -> np.ndarray | None:
    """Probability that each cell of a 256x256 grid stretched over `img` shows a person; None where
    the segmenter is not installed."""
    if _model_path() is None:
        return None
    x = np.asarray(img.convert("RGB").resize((INPUT_SIDE, INPUT_SIDE), Image.BILINEAR), dtype=np.float32)
    interpreter = _interpreter()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x[None] / 255.0)
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0, :, :, 0])


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
