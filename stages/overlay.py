"""overlay stage: draws the planner's chosen proposal onto the image.

Whether a scrim goes behind the text is decided by stages.legibility.measure_line, the measure
readability_eval checks with: the text is drawn on the bare image and measured line by line; if
any line fails, a flat semi-transparent scrim is laid over the text block at the least opacity from
SCRIM_ALPHA_STEPS at which every line passes. A proposal that asks for a backing (the planner's
full-width band) starts at BACKING_MIN_ALPHA. A proposal with a "canvas" (the planner's extension)
is drawn on the photo pasted onto that taller canvas; the result's "canvas" says where the photo
sits, for the evaluators. The result records every line's exact ink box so the evaluators measure
what was drawn, not what was planned.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from stages import fonts, imaging, legibility, textlayout
from stages.boxes import parse_box
from stages.contract import PermanentStageError, StageInput, StageOutput

MIN_CONTRAST = imaging.WCAG_AA_NORMAL
SCRIM_ALPHA_STEPS = tuple(round(a, 2) for a in np.arange(0.30, 1.0001, 0.05))
BACKING_MIN_ALPHA = 0.8  # a band reads as a designed backing, not as a tinted strip of photo


def _chosen_proposal(plan: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not plan:
        raise PermanentStageError("the planner result is missing: nothing says where the text goes")
    wanted = plan.get("proposal_id")
    for proposal in plan.get("proposals") or []:
        if proposal.get("proposal_id") == wanted:
            return proposal
    raise PermanentStageError(f"the planner's chosen proposal {wanted!r} is not among its proposals")


def _draw_lines(img: Image.Image, placed, font, text_rgb, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    draw = ImageDraw.Draw(img)
    for p in placed:
        draw.text((p.origin[0] - shift[0], p.origin[1] - shift[1]), p.text, font=font, fill=text_rgb, anchor="la")
    return img


def _measure(
    base: Image.Image, at: Sequence[int], box: Sequence[int], placed, ink, font, text_rgb, size, bold: bool
) -> list[dict[str, Any]]:
    """Every line's legibility when drawn on `base`, the crop at `at` of the drawn-on image."""
    rendered = _draw_lines(base.copy(), placed, font, text_rgb, (at[0], at[1]))
    rendered_px, drawn_px = imaging.rgb_array(rendered), imaging.rgb_array(base)
    return [
        legibility.measure_line(
            rendered_px, drawn_px, b, text_rgb, font.size, size, bold=bold, limits=box, origin=(at[0], at[1])
        )
        for b in ink
        if b is not None
    ]


def _scrim_colour(text_rgb) -> tuple[int, int, int]:
    text_lum = imaging.relative_luminance(text_rgb)
    return (
        (0, 0, 0)
        if imaging.contrast_ratio(text_lum, 0.0) >= imaging.contrast_ratio(text_lum, 1.0)
        else (255, 255, 255)
    )


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
    canvas = imaging.parse_canvas(proposal.get("canvas"), img.size)
    if canvas:
        img = imaging.extend_canvas(img, canvas)
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

    if all(b is None for b in ink):
        raise PermanentStageError("planner proposal's lines draw no visible glyph")
    bold = legibility.is_bold(fonts.font_path())
    backing = bool(proposal.get("backing"))
    # The crop holds the block and any glyph overhang past it; the scrim covers the block only.
    inked = [b for b in ink if b is not None]
    at = (
        min([box[0]] + [b[0] for b in inked]),
        min([box[1]] + [b[1] for b in inked]),
        max([box[2]] + [b[2] for b in inked]),
        max([box[3]] + [b[3] for b in inked]),
    )
    crop = img.crop(at)
    inner = (box[0] - at[0], box[1] - at[1], box[2] - at[0], box[3] - at[1])
    bare = _measure(crop, at, box, placed, ink, font, text_rgb, img.size, bold)
    facts: dict[str, Any] = {
        "background_contrast": min(r["contrast"] for r in bare),
        "background_adjacent_below_share": max(r["adjacent_below_share"] for r in bare),
        "background_busyness": max(r["busyness"] for r in bare),
        "scrim": False,
        "backing": backing,
        "legibility_rule": legibility.RULE,
    }
    rows = bare
    if backing or not all(r["passed"] for r in bare):
        scrim_rgb = _scrim_colour(text_rgb)
        steps = [a for a in SCRIM_ALPHA_STEPS if not backing or a >= BACKING_MIN_ALPHA]
        alpha = None
        for step in steps:
            scrimmed = imaging.blend_box(crop, inner, scrim_rgb, step)
            measured = _measure(scrimmed, at, box, placed, ink, font, text_rgb, img.size, bold)
            if all(r["passed"] for r in measured):
                alpha, rows = float(step), measured
                break
        if alpha is None:
            # Not even an opaque scrim makes every line pass (text below the size floor, say): it
            # is drawn opaque, and readability_eval reports which check failed.
            alpha = 1.0
            rows = _measure(imaging.blend_box(crop, inner, scrim_rgb, alpha), at, box, placed, ink, font,
                            text_rgb, img.size, bold)
        img = imaging.blend_box(img, box, scrim_rgb, alpha)
        facts.update(
            scrim=True, scrim_box=list(box), scrim_color=imaging.rgb_to_hex(scrim_rgb), scrim_alpha=alpha
        )
    else:
        img = img.copy()
    facts["legible"] = all(r["passed"] for r in rows)

    _draw_lines(img, placed, font, text_rgb)
    facts["text_boxes"] = [
        {"text": p.text, "box": list(b)} for p, b in zip(placed, ink, strict=True) if b is not None
    ]
    facts["lines"] = lines
    facts["text_color"] = imaging.rgb_to_hex(text_rgb)
    facts["font_size"] = font_size
    facts["box"] = list(box)
    if canvas:
        facts["canvas"] = canvas
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
