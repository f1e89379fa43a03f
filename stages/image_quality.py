"""How well exposed and how sharp a photograph is, from its pixels: the image-quality term of the
best-variant rule (stages/instagram_feed_gen.py). Measured by the planner on its thumbnail of the
original image, before any text, so a variant is not rewarded for the scrim or the type laid over
it.

Exposure: the mean CIE lightness L* (0-100) and the shares of clipped shadows and highlights. An
ad photo reads well with its mean between EXPOSED_LOW and EXPOSED_HIGH (a studio shot on white is
bright, not over-exposed, so only clipping marks that); the score falls linearly to 0 at DARK /
BRIGHT, and clipping beyond CLIP_ALLOWED of the pixels costs as much as it exceeds.

Sharpness: the variance of the Laplacian of the grey image at SHARPNESS_SIDE px on the long side
(Pech-Pacheco et al. 2000; the scale is fixed so the figure does not depend on the upload size),
over the EDGE_SHARE of pixels with the strongest gradient only, so that a product on a plain
background is judged by its edges and not diluted by the background; scored on a log scale
between BLURRED and SHARP.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from stages import imaging

EXPOSED_LOW, EXPOSED_HIGH = 35.0, 90.0  # mean L* of a well exposed photograph
DARK, BRIGHT = 12.0, 98.0  # mean L* where the exposure score reaches 0
SHADOW_L, HIGHLIGHT_L = 3.0, 97.0  # L* below / above which a pixel counts as clipped
CLIP_ALLOWED = 0.05  # share of clipped pixels that costs nothing (a black jacket, a white sky)
SHARPNESS_SIDE = 384  # the planner's analysis thumbnail (planner.ANALYSIS_MAX_SIDE): no second resize
EDGE_SHARE = 0.1  # the strongest-gradient pixels sharpness is measured on
BLURRED, SHARP = 30.0, 1500.0  # Laplacian variance on edges (8-bit grey) scored 0 and 1

RULE = (
    f"image_quality = mean of exposure and sharpness, each in [0, 1], on the original image: exposure 1 for a "
    f"mean L* in [{EXPOSED_LOW:g}, {EXPOSED_HIGH:g}], falling linearly to 0 at {DARK:g} and {BRIGHT:g}, minus the "
    f"share of clipped pixels (L* < {SHADOW_L:g} or > {HIGHLIGHT_L:g}) above {CLIP_ALLOWED:g}; sharpness from the "
    f"variance of the Laplacian on the {EDGE_SHARE:g} strongest-gradient pixels at {SHARPNESS_SIDE} px, log-scaled from {BLURRED:g} (0) to {SHARP:g} (1)"
)


def _lightness(img: Image.Image) -> np.ndarray:
    y = imaging.luminance_8bit(np.asarray(img.convert("RGB"), dtype=np.uint8))
    # CIE L* from relative luminance Y (D65 white: Y_n = 1).
    return np.where(y > (6 / 29) ** 3, 116.0 * np.cbrt(y) - 16.0, y * (29 / 3) ** 3)


def _work_copy(img: Image.Image) -> Image.Image:
    # Both measures are statistics of the whole frame: a copy at SHARPNESS_SIDE gives them for a
    # fraction of the pixels, and a fixed scale keeps sharpness independent of the upload size.
    return imaging.downscaled(img, SHARPNESS_SIDE)[0]


def exposure(img: Image.Image) -> dict:
    lightness = _lightness(_work_copy(img))
    mean = float(lightness.mean())
    shadows = float(np.mean(lightness < SHADOW_L))
    highlights = float(np.mean(lightness > HIGHLIGHT_L))
    if mean < EXPOSED_LOW:
        score = (mean - DARK) / (EXPOSED_LOW - DARK)
    elif mean > EXPOSED_HIGH:
        score = (BRIGHT - mean) / (BRIGHT - EXPOSED_HIGH)
    else:
        score = 1.0
    score -= max(0.0, shadows + highlights - CLIP_ALLOWED)
    return {"mean_lightness": round(mean, 2), "clipped_shadows": round(shadows, 4),
            "clipped_highlights": round(highlights, 4), "score": round(min(1.0, max(0.0, score)), 4)}


def sharpness(img: Image.Image) -> dict:
    grey = np.asarray(_work_copy(img).convert("L"), dtype=np.float64)
    if min(grey.shape) < 3:
        return {"laplacian_variance": 0.0, "score": 0.0}
    lap = (grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:] - 4.0 * grey[1:-1, 1:-1])
    gradient = np.hypot(grey[2:, 1:-1] - grey[:-2, 1:-1], grey[1:-1, 2:] - grey[1:-1, :-2])
    edges = gradient >= np.quantile(gradient, 1.0 - EDGE_SHARE)
    variance = float(lap[edges].var()) if edges.any() else 0.0
    if variance <= BLURRED:
        score = 0.0
    else:
        score = min(1.0, math.log(variance / BLURRED) / math.log(SHARP / BLURRED))
    return {"laplacian_variance": round(variance, 2), "score": round(score, 4)}


def measure(img: Image.Image) -> dict:
    work = _work_copy(img)
    exp, sharp = exposure(work), sharpness(work)
    return {"exposure": exp, "sharpness": sharp, "score": round((exp["score"] + sharp["score"]) / 2, 4),
            "rule": RULE}
