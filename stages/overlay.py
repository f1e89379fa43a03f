"""overlay stage: draws the planner's chosen proposal onto the image.

When the background under the text would give less than WCAG's 4.5:1 (measured on the 10% of
background pixels closest to the text colour), or is too busy to read text on, a flat
semi-transparent scrim is laid behind the text first, just opaque enough to fix both. The result
records every line's exact ink box so the evaluators measure what was drawn, not what was planned.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Mapping

import numpy as np
from PIL import Image, ImageDraw

from stages import fonts, imaging, saliency, textlayout
from stages.boxes import parse_box
from stages.contract import PermanentStageError, StageInput, StageOutput

MIN_CONTRAST = imaging.WCAG_AA_NORMAL
# Aim a little past both limits: anti-aliased glyph edges read slightly weaker than the fill, and
# the evaluator samples a slightly different area around each line.
SCRIM_TARGET_CONTRAST = 5.0
SCRIM_TARGET_BUSYNESS = 0.8 * saliency.MAX_BUSYNESS
SCRIM_ALPHA_STEPS = tuple(round(a, 2) for a in np.arange(0.30, 1.0001, 0.05))


def _chosen_proposal(plan: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not plan:
        raise PermanentStageError("the planner result is missing: nothing says where the text goes")
    wanted = plan.get("proposal_id")
    for proposal in plan.get("proposals") or []:
        if proposal.get("proposal_id") == wanted:
            return proposal
    raise PermanentStageError(f"the planner's chosen proposal {wanted!r} is not among its proposals")


def _busyness(rgb: np.ndarray) -> float:
    return saliency.edge_density(imaging.luma(rgb))


def _scrim_alpha(background: np.ndarray, text_rgb, scrim_rgb) -> float:
    """Least opacity from SCRIM_ALPHA_STEPS at which the scrimmed background meets both targets."""
    for alpha in SCRIM_ALPHA_STEPS:
        blended = np.rint(background * (1.0 - alpha) + np.asarray(scrim_rgb, dtype=np.float64) * alpha)
        contrast = imaging.worst_contrast(text_rgb, imaging.relative_luminance(blended))
        if contrast >= SCRIM_TARGET_CONTRAST and _busyness(blended) <= SCRIM_TARGET_BUSYNESS:
            return float(alpha)
    return 1.0


def render(img: Image.Image, proposal: Mapping[str, Any]) -> tuple[Image.Image, dict]:
    """Draws the proposal; returns the new image and the facts the result records."""
    try:
        font_size = int(proposal["font_size"])
        text_rgb = imaging.hex_to_rgb(str(proposal["color"]))
        raw_lines = list(proposal["lines"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PermanentStageError(f"planner proposal is malformed: {type(exc).__name__}: {exc}") from None
    if font_size <= 0:
        raise PermanentStageError(f"planner proposal has a non-positive font size {font_size}")
    box = tuple(int(round(v)) for v in parse_box(proposal.get("box"), "planner proposal"))
    width, height = img.size
    if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
        raise PermanentStageError(f"planner proposal box {list(box)} lies outside the {width}x{height} image")
    lines = [line for line in (fonts.clean_text(line) for line in raw_lines) if line]
    if not lines:
        raise PermanentStageError("planner proposal has no renderable text lines")

    font = fonts.load_font(font_size)
    placed = textlayout.place_lines(lines, font, box, str(proposal.get("align", "center")))
    ink = [textlayout.ink_box(p.text, font, p.origin) for p in placed]
    for p, b in zip(placed, ink, strict=True):
        if b is not None and (b[0] < 0 or b[1] < 0 or b[2] > width or b[3] > height):
            raise PermanentStageError(f"line {p.text!r} would be drawn outside the image at {list(b)}")

    under = imaging.rgb_array(img.crop(box))
    background_contrast = imaging.worst_contrast(text_rgb, imaging.relative_luminance(under))
    background_busyness = _busyness(under)
    facts: dict[str, Any] = {
        "background_contrast": round(background_contrast, 3),
        "background_busyness": round(background_busyness, 4),
        "scrim": False,
    }
    if background_contrast < MIN_CONTRAST or background_busyness > saliency.MAX_BUSYNESS:
        text_lum = imaging.relative_luminance(text_rgb)
        scrim_rgb = (
            (0, 0, 0)
            if imaging.contrast_ratio(text_lum, 0.0) >= imaging.contrast_ratio(text_lum, 1.0)
            else (255, 255, 255)
        )
        alpha = _scrim_alpha(under, text_rgb, scrim_rgb)
        img = imaging.blend_box(img, box, scrim_rgb, alpha)
        facts.update(
            scrim=True, scrim_box=list(box), scrim_color=imaging.rgb_to_hex(scrim_rgb), scrim_alpha=alpha
        )
    else:
        img = img.copy()

    draw = ImageDraw.Draw(img)
    for p in placed:
        draw.text(p.origin, p.text, font=font, fill=text_rgb, anchor="la")
    facts["text_boxes"] = [
        {"text": p.text, "box": list(b)} for p, b in zip(placed, ink, strict=True) if b is not None
    ]
    facts["lines"] = lines
    facts["text_color"] = imaging.rgb_to_hex(text_rgb)
    facts["font_size"] = font_size
    facts["box"] = list(box)
    return img, facts


def run(inp: StageInput) -> StageOutput:
    img = imaging.load_image(inp.image)
    plan = inp.results.get("planner")
    proposal = _chosen_proposal(plan)
    rendered, facts = render(img, proposal)
    result = {
        "overlay_id": str(uuid.uuid4()),
        "proposal_id": proposal["proposal_id"],
        "text": plan.get("text", " ".join(facts["lines"])),
        "font": os.path.basename(fonts.font_path()),
        "image_size": list(rendered.size),
        **facts,
    }
    return StageOutput(result=result, artifacts={"overlay.png": imaging.encode_png(rendered)})
