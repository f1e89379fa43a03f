"""readability_eval stage: the legibility of each rendered line, by the measure overlay decided with.

Every line goes through stages.legibility.measure_line, the function overlay used to decide on its
scrim or backing, so a creative the overlay judged legible passes here unless its pixels changed.
Ink is found by comparing the overlay with what the overlay stage drew the text onto (the original
image, with the recorded scrim laid over it): a background pixel that happens to have the text
colour stays background, so it lowers the contrast as it should instead of being mistaken for text.
"""

from __future__ import annotations

from typing import Any, Mapping

from PIL import Image

from stages import fonts, imaging, legibility
from stages.boxes import parse_box, read_text_boxes
from stages.contract import PermanentStageError, StageInput, StageOutput

THRESHOLDS = legibility.thresholds()

def _drawn_on(inp: StageInput, overlay: Mapping[str, Any], size: tuple[int, int]) -> Image.Image:
    """The image the overlay stage drew text onto: the original (on its extended canvas, if the
    planner extended it) plus its scrim, if any."""
    base = imaging.load_image(inp.image)
    canvas = imaging.parse_canvas(overlay.get("canvas"), base.size)
    if canvas:
        base = imaging.extend_canvas(base, canvas)
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


def run(inp: StageInput) -> StageOutput:
    overlay = inp.results.get("overlay")
    lines = read_text_boxes(overlay, "there is no rendered text to measure")
    rendered = imaging.artifact_image(inp.read_artifact, overlay, "overlay.png", "overlay")
    drawn_on = _drawn_on(inp, overlay, rendered.size)
    text_rgb = imaging.parse_colour(overlay.get("text_color", "#000000"), "overlay text_color")
    limits = parse_box(overlay["box"], "overlay text block") if overlay.get("box") else None
    bold = legibility.is_bold(str(overlay.get("font") or fonts.font_path()))
    rendered_px, drawn_px = imaging.rgb_array(rendered), imaging.rgb_array(drawn_on)

    rows = []
    for line in lines:
        # The em size is the text size readers judge by; without it, the ink height stands in.
        font_px = float(overlay.get("font_size") or (line.box[3] - line.box[1]))
        row = legibility.measure_line(
            rendered_px, drawn_px, line.box, text_rgb, font_px, rendered.size, bold=bold, limits=limits
        )
        rows.append({"text": line.text, "box": list(line.box), **row})
    return StageOutput(
        result={
            "overlay_id": overlay.get("overlay_id"),
            "boxes": rows,
            "min_contrast": min(r["contrast"] for r in rows),
            "max_adjacent_below_share": max(r["adjacent_below_share"] for r in rows),
            "max_busyness": max(r["busyness"] for r in rows),
            "min_css_px": min(r["css_px"] for r in rows),
            "thresholds": dict(THRESHOLDS),
            "contrast_rule": "WCAG 2.x ratio against the 10% of background pixels closest in "
            "luminance to the text colour",
            "rule": legibility.RULE,
            "passed": all(r["passed"] for r in rows),
            # How far the least legible line is above its required contrast (1.0: just at it):
            # the legibility margin of the best-variant rule.
            "min_contrast_margin": round(min(r["contrast"] / r["required_contrast"] for r in rows), 3),
        }
    )
